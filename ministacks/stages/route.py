"""`route`: train the meta-router of a finished continual run (docs/brainstacks.md §6) and measure what it learned.

    1. prompts   each domain's validation examples (the stacks never trained on them; the evaluation
                 reads the test split) + mixed-domain prompts built from the same split (data/mixed.py)
    2. targets   oracle.py: every combination of domain stacks on every answer, chat at its inference
                 floor (cached in RUN/router/)
    3. features  the raw prompt through the base with every stack off (router.prompt_features)
    4. split     by prompt groups: prompts sharing a source example stay on one side (no leak)
    5. train     router.train_router; the best epoch by the paper's selection score
    6. write     RUN/router/model.safetensors + config.json (the router), RUN/router.json (what it learned:
                 single_top1 and mixed_set_match against the targets, label_top1 and label_set_match
                 against the domain labels, the oracle's winning combinations per domain under both
                 searches, the routes the router picks per domain) and RUN/router.png

Run again, it reuses the cached targets (the expensive part) if the stacks and prompts are unchanged.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn

from ..data import MIXED_KINDS, load_split, mixed_prompts, raw_prompt
from ..io import atomic_write_json, read_json
from ..presets import Preset
from ..report.paper import PAPER_ORACLE
from ..report.plots import plot_router
from ..routing.oracle import (ComboLosses, OracleResult, combo_name, find_targets, greedy_best, oracle_floor,
                     shares, winning_shares)
from ..routing.router import (ROUTER_DIR, MetaRouter, RouterConfig, RouterData, prompt_features, router_metrics,
                              routing_weights, save_router, train_router)
from ..run import load_run
from ..stacks.manifest import content_key
from ..training.examples import ExampleSet
from .common import add_run_args, writable_folder

HELP = "train the meta-router of a trained run"

def group_split(sources: list[tuple[str, ...]], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Rows -> (train rows, val rows), whole groups at a time. Two rows are in one group when they share
    a source example (directly or through a chain), so no prompt's text is on both sides. A group goes
    to val when a hash of (seed, its smallest source) falls below `val_fraction`: stable, no RNG state."""
    parent: dict[str, str] = {}  # union-find over source keys: a source's parent, a root its own

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]  # path halving: chains stay short however the unions came
            x = parent[x]
        return x

    for srcs in sources:
        for s in srcs:  # a row's sources are one group: a mixed prompt joins every example it was built from
            parent[find(s)] = find(srcs[0])
    smallest: dict[str, str] = {}  # group root -> its smallest source: a name that does not depend on order
    for s in parent:
        root = find(s)
        smallest[root] = min(smallest.get(root, s), s)

    def is_val(row_sources: tuple[str, ...]) -> bool:
        # a hash, not a shuffle: a group's side depends on its sources, not on row order or a generator
        digest = hashlib.sha256(f"{seed}:{smallest[find(row_sources[0])]}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction

    train, val = [], []
    for i, srcs in enumerate(sources):
        (val if is_val(srcs) else train).append(i)
    return train, val


def _targets_key(run: Path, manifest: dict, examples: list, cfg: RouterConfig) -> str:
    """The oracle's cache key: sha256 over what the targets are computed from.

    - the base and the stacks' content (stacks.manifest.content_key): a stack retrained under the same
      name changes the key, where a key of names would hand back the old stacks' targets;
    - the prompts (Example.key(): normalised instruction + input) and their answers, in order, as the
      targets are rows and each is the loss of its answer;
    - the settings that change the search or the targets built from its answer."""
    search = [cfg.search, cfg.min_gain, cfg.chat_floor, cfg.oracle_chat_floor, cfg.reasoning_soft, cfg.label_weight]
    return content_key(run, manifest, [[ex.key(), ex.response] for ex in examples], search)


def oracle_targets(model: nn.Module, tok, examples: list, domains: tuple[str, ...], manifest: dict, run: Path,
                   cfg: RouterConfig, seq_len: int) -> OracleResult:
    """find_targets on the answers, cached in RUN/router/targets.json under `_targets_key`.

    The loss is completion-only: the oracle asks which stacks make the *answer* more likely, not the
    prompt. The cache is there because this is the stage's expensive part: a pass over every prompt per
    combination (2^D of them with the base, exhaustive search), where the features take one base pass."""
    path = run / ROUTER_DIR / "targets.json"
    key = _targets_key(run, manifest, examples, cfg)
    if path.is_file():
        cached = read_json(path)
        if cached.get("key") == key:
            return OracleResult.from_dict(cached["result"])
    # no cache, or one for other stacks, prompts or settings: searched afresh, and the cache overwritten
    data = ExampleSet(tok, examples, completion_only=True, max_len=seq_len)
    result = find_targets(ComboLosses(model, data, oracle_floor(cfg, domains)), [ex.domain for ex in examples],
                          domains, cfg)
    atomic_write_json(path, {"key": key, "result": result.to_dict()})
    return result


def searches_compared(oracle: OracleResult, labels: list[str], cfg: RouterConfig) -> dict:
    """Both searches' winning combinations per domain, from the losses the oracle already measured: the
    exhaustive search measures every combination, so the greedy search's answer costs nothing more.
    After a greedy search only the greedy answer is known (its table lacks combinations it never tried)."""
    out = {cfg.search: winning_shares(oracle.best, labels, oracle.domains)}
    if cfg.search == "exhaustive":
        greedy = greedy_best(ComboLosses.from_table(oracle.losses), oracle.domains, cfg.min_gain)
        out["greedy"] = winning_shares(greedy, labels, oracle.domains)
    return out


def answerable(tok, examples: list, max_len: int) -> list:
    """The examples whose answer has at least one token inside `max_len`: the oracle scores answers, and
    an example whose answer is cut off entirely has nothing to score. Its loss would be 0 under every
    combination, so the search would name the base its winner for no reason (ComboLosses refuses it)."""
    scored = ExampleSet(tok, examples, completion_only=True, max_len=max_len).scored
    return [ex for ex, n in zip(examples, scored.tolist()) if n > 0]


def router_prompts(tok, domains: tuple[str, ...], preset: Preset,
                   cfg: RouterConfig) -> tuple[list, list, list[str]]:
    """What a router learns from: (single-domain prompts with an answer, mixed-domain prompts, the mixed kinds).

    The validation split: the stacks never trained on it, so the oracle measures what they do for answers
    they have not seen, as at inference; the test split stays unseen for `eval`. Only the mixed kinds whose
    domains all have stacks in the run (a run may train a subset)."""
    singles = [ex for d in domains for ex in load_split(d, "val", preset.data)[: cfg.prompts_per_domain]]
    singles = answerable(tok, singles, preset.stack.seq_len)
    kinds = [k for k, labels in MIXED_KINDS.items() if set(labels) <= set(domains)]
    mixed = [m for m in mixed_prompts(preset.data, "val", cfg.mixed_per_kind, seed=cfg.seed) if m.kind in kinds]
    return singles, mixed, kinds


def fit_router(model: nn.Module, tok, domains: tuple[str, ...], singles: list, mixed: list, oracle: OracleResult,
               cfg: RouterConfig, progress: bool = True) -> tuple[MetaRouter, dict]:
    """The router trained on `oracle`'s targets for the single-domain prompts and on the multi-hot labels of the
    mixed ones, its epoch chosen on held-out groups of prompts; returns it and {"history", "best_epoch",
    "final" (router_metrics on the held-out prompts), "routes" (per domain: mean p and the sets switched on),
    "n_prompts"}. `model` computes the features: the base with every stack off (prompt_features)."""
    D = len(domains)
    # Features come from the base with every stack off, from the raw prompt (no template): the router decides
    # which stacks run, so what it reads cannot depend on them, and StackedRun routes from the same features.
    texts = [raw_prompt(ex) for ex in singles] + [m.text for m in mixed]
    features, mask = prompt_features(model, tok, texts, cfg)
    # −1 marks a mixed row: router_metrics scores single and mixed prompts apart by it
    label = torch.tensor([domains.index(ex.domain) for ex in singles] + [-1] * len(mixed))
    label_set = torch.zeros(len(texts), D)  # [N, D] multi-hot: the domains a prompt came from
    for i, ex in enumerate(singles):
        label_set[i, domains.index(ex.domain)] = 1.0
    for i, m in enumerate(mixed, start=len(singles)):
        for d in m.labels:
            label_set[i, domains.index(d)] = 1.0
    # Mixed prompts are trained on their multi-hot labels (docs/brainstacks.md §6): having no answer they
    # have no outcome to measure, and the labels name the domains the prompt was built to need.
    targets = torch.cat([oracle.targets, label_set[len(singles):]])
    data = RouterData(features, mask, targets, label, label_set)
    # Split by groups of prompts sharing a source example: a mixed prompt contains the text of validation
    # examples that are also single prompts, and with one on each side the epoch selection would score
    # the router on text it was trained on.
    sources = [(ex.key(),) for ex in singles] + [tuple(m.sources) for m in mixed]
    train_rows, val_rows = group_split(sources, cfg.val_fraction, cfg.seed)
    train, val = data.subset(torch.tensor(train_rows)), data.subset(torch.tensor(val_rows))

    router = MetaRouter(features.shape[-1], domains, cfg)
    fit = train_router(router, train, val, cfg, progress=progress)  # `router` holds the best epoch's weights

    # what the router does on the held-out prompts of each domain: mean p, and the set the inference rule
    # switches on (routing_weights), i.e. the stacks `eval`'s routed mode would run for such a prompt
    p_val = router.probabilities(val.features, val.mask)
    routes: dict[str, dict] = {}
    for d_i, d in enumerate(domains):
        rows = (val.label == d_i).nonzero().flatten().tolist()
        picked = [combo_name([x for x in domains if x in routing_weights(dict(zip(domains, p_val[r].tolist())), cfg)])
                  for r in rows]
        routes[d] = {"n": len(rows), "mean_p": p_val[rows].mean(0).tolist() if rows else [], "shares": shares(picked)}
    final = router_metrics(router, val, cfg)  # the kept epoch, on the held-out groups
    return router, {"history": fit["history"], "best_epoch": fit["best_epoch"], "final": final, "routes": routes,
                    "n_prompts": {"single": len(singles), "mixed": len(mixed), "train": len(train_rows),
                                  "val": len(val_rows)}}


def route_stage(path: str | Path, preset: Preset | str | None = None, progress: bool = True,
                cfg: RouterConfig | None = None, search: str | None = None) -> dict:
    """Train the router of the run at `path`; write the router and RUN/router.json; return router.json.

    The run's own Preset is used (run.run_preset), with `preset`'s router settings if one is given; `cfg`
    replaces the RouterConfig outright; `search` ("exhaustive" or "greedy") overrides its search."""
    t0 = time.time()
    # router=False: the router is what this stage makes, so an existing one (for other stacks, or
    # damaged, which would be a load error) is not read; it is overwritten below
    sr = load_run(path, preset, router=False)
    run, model, tok, domains = sr.paths.run, sr.model, sr.tok, sr.domains
    cfg = cfg or sr.preset.router
    if search is not None:
        cfg = replace(cfg, search=search)
    torch.manual_seed(cfg.seed)  # the router's initialisation and its dropout (its batch order has its own)
    singles, mixed, kinds = router_prompts(tok, domains, sr.preset, cfg)

    # the oracle scores single-domain prompts only: a mixed prompt has no answer to measure a loss on
    oracle = oracle_targets(model, tok, singles, domains, sr.manifest, run, cfg, sr.preset.stack.seq_len)
    t_oracle = time.time() - t0
    router, fit = fit_router(model, tok, domains, singles, mixed, oracle, cfg, progress)
    save_router(run, router, model)
    final, routes, n_prompts = fit["final"], fit["routes"], fit["n_prompts"]
    # router.json: what the router learned, and what the oracle found that it could learn from
    result = {
        "domains": list(domains),
        # against the oracle's targets, the quantities the router is trained on and selected by
        "single_top1": final["single_top1"],
        "mixed_set_match": final["mixed_set_match"],
        # Against the prompts' domain labels: how often the router agrees with where a prompt came from.
        # Reported apart, never in the selection: a router that learned "medical → chat+math" from the
        # oracle scores high above and low here: the gap is the paper's central finding (docs/brainstacks.md §6).
        "label_top1": final["label_top1"],
        "label_set_match": final["label_set_match"],
        "val_bce": final["bce"],
        "best_epoch": fit["best_epoch"],
        "history": fit["history"],
        # per domain, the share of its prompts each combination won (paper: chat+math on 97% of medical ones)
        "oracle": winning_shares(oracle.best, [ex.domain for ex in singles], domains),
        "oracle_by_search": searches_compared(oracle, [ex.domain for ex in singles], cfg),
        "oracle_chat_floor": oracle_floor(cfg, domains),
        # every combination the search measured, its mean answer loss over all single prompts
        "oracle_mean_loss": {combo_name(c): float(v.mean()) for c, v in oracle.losses.items()},
        "routes": routes,
        "n_prompts": n_prompts,
        "mixed_kinds": kinds,
        "params": sum(p.numel() for p in router.parameters()),
        "search": cfg.search,
        "config": asdict(cfg),  # the RouterConfig it ran with: report.md states its rule from here
        "seconds": {"oracle": t_oracle, "total": time.time() - t0},
        "paper": {"oracle": PAPER_ORACLE},  # the paper's medical shares (32 of 33 chat+math), for the report
        "files": {"router": str(run / ROUTER_DIR), "json": str(run / "router.json"), "plot": str(run / "router.png")},
    }
    atomic_write_json(run / "router.json", result)
    plot_router(result, run / "router.png")
    return result


def add_args(p) -> None:
    add_run_args(p)
    p.add_argument("--search", choices=["exhaustive", "greedy"], default=None,
                   help="how the oracle finds each prompt's best stack combination: exhaustive (default, all "
                        "2^D - 1) or greedy (the released code's search)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def main(args) -> int:
    if Path(args.run).is_dir():  # a missing one: locate_run's message says what to pass
        writable_folder(args.run, "--run")  # the router is written into the run
    r = route_stage(args.run, args.preset, progress=not args.no_progress, search=args.search)
    print(f"router, against the oracle's targets: single top-1 {r['single_top1']:.3f}, mixed set match "
          f"{r['mixed_set_match']:.3f}, val BCE {r['val_bce']:.3f} "
          f"(epoch {r['best_epoch']} kept; {r['params']:,} parameters)")
    print(f"router, against the domain labels: top-1 {r['label_top1']:.3f}, set match {r['label_set_match']:.3f}")
    print("oracle's best stack combination, share of each domain's prompts:")
    for d, o in r["oracle"].items():
        print(f"  {d:10s} " + ", ".join(f"{c} {v:.0%}" for c, v in list(o["shares"].items())[:4]))
    print(f"wrote {Path(r['files']['router'])} and {Path(r['files']['json'])}")
    return 0
