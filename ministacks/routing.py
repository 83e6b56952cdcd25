"""`route`: train the meta-router of a finished continual run (spec §6) and measure what it learned.

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
from safetensors.torch import save as safetensors_to_bytes

from .data import MIXED_KINDS, load_split, mixed_prompts, raw_prompt
from .io import RunFileError, atomic_write_bytes, atomic_write_json, read_checked_tensors, read_json, read_json_file, record_checksum
from .oracle import (ComboLosses, OracleResult, combo_name, find_targets, greedy_best, oracle_floor,
                     shares, winning_shares)
from .router import MetaRouter, RouterConfig, RouterData, prompt_features, router_metrics, routing_weights, train_router
from .store import base_fingerprint, content_key
from .train import ExampleSet

ROUTER_DIR = "router"

# spec §6: the paper's oracle on medical prompts (Gemma 3 12B): chat+math 32 of 33, medical alone 1 of 33
PAPER_ORACLE = {"medical": {"chat+math": 32 / 33, "medical": 1 / 33}}


def group_split(sources: list[tuple[str, ...]], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Rows -> (train rows, val rows), whole groups at a time. Two rows are in one group when they share
    a source example (directly or through a chain), so no prompt's text is on both sides. A group goes
    to val when a hash of (seed, its smallest source) falls below `val_fraction`: stable, no RNG state."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for srcs in sources:
        for s in srcs:
            parent[find(s)] = find(srcs[0])
    smallest: dict[str, str] = {}  # group root -> its smallest source: a name that does not depend on order
    for s in parent:
        root = find(s)
        smallest[root] = min(smallest.get(root, s), s)

    def is_val(row_sources: tuple[str, ...]) -> bool:
        digest = hashlib.sha256(f"{seed}:{smallest[find(row_sources[0])]}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction

    train, val = [], []
    for i, srcs in enumerate(sources):
        (val if is_val(srcs) else train).append(i)
    return train, val


def _targets_key(run: Path, manifest: dict, examples: list, cfg: RouterConfig) -> str:
    """The oracle's cache key: the stacks' content (store.content_key), the prompts, the search's settings."""
    search = [cfg.search, cfg.min_gain, cfg.chat_floor, cfg.oracle_chat_floor, cfg.reasoning_soft, cfg.label_weight]
    return content_key(run, manifest, [ex.key() for ex in examples], search)


def oracle_targets(model: nn.Module, tok, examples: list, domains: tuple[str, ...], manifest: dict, run: Path,
                   cfg: RouterConfig, seq_len: int) -> OracleResult:
    """find_targets on the answers (completion-only loss), cached in RUN/router/targets.json."""
    path = run / ROUTER_DIR / "targets.json"
    key = _targets_key(run, manifest, examples, cfg)
    if path.is_file():
        cached = read_json(path)
        if cached.get("key") == key:
            return OracleResult.from_dict(cached["result"])
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
    an example whose answer is cut off entirely has nothing to score."""
    scored = ExampleSet(tok, examples, completion_only=True, max_len=max_len).scored
    return [ex for ex, n in zip(examples, scored.tolist()) if n > 0]


def save_router(run: Path, router: MetaRouter, model: nn.Module) -> None:
    """RUN/router/model.safetensors, then RUN/router/config.json: the router's shape and settings, the
    base it was trained on, the tensor file's sha256 and size, and record_sha256 over the record (the
    same two checksums as a stack's, store.py): a kill between the two files, a damaged file or an edited
    setting is then a load error naming the file, not a router that routes wrongly."""
    folder = run / ROUTER_DIR
    data = safetensors_to_bytes({k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()})
    atomic_write_bytes(folder / "model.safetensors", data)
    record = {"token_dim": router.token_dim, "domains": list(router.domains), "router": asdict(router.cfg),
              "base_fingerprint": base_fingerprint(model), "tensor_file": "model.safetensors",
              "sha256": hashlib.sha256(data).hexdigest(), "n_bytes": len(data)}
    record["record_sha256"] = record_checksum(record)
    atomic_write_json(folder / "config.json", record)


def load_router(run: str | Path, model: nn.Module) -> MetaRouter | None:
    """The run's router, or None if `route` has not been run. Refused, naming the file, if it was trained
    on another base, or a file is missing, damaged or edited. Routers saved before the checksums were
    recorded load without them."""
    folder = Path(run) / ROUTER_DIR
    tensor_path, config_path = folder / "model.safetensors", folder / "config.json"
    if not tensor_path.is_file():
        return None
    fix = f"train the router again with `python -m ministacks route {Path(run)}`"
    meta = read_json_file(config_path, fix)
    need = ("token_dim", "domains", "router", "base_fingerprint")
    if not isinstance(meta, dict) or any(k not in meta for k in need):
        raise RunFileError(config_path, f"damaged: not a router record (it needs {list(need)}); {fix}")
    if "record_sha256" in meta and meta["record_sha256"] != record_checksum(meta):
        raise RunFileError(config_path, f"edited or damaged: the record does not match its record_sha256; {fix}")
    if meta["base_fingerprint"] != base_fingerprint(model):
        raise RunFileError(config_path, f"the router in {folder} was trained on another base; {fix}")
    try:
        router = MetaRouter(meta["token_dim"], meta["domains"], RouterConfig(**meta["router"]))
    except (TypeError, ValueError) as e:
        raise RunFileError(config_path, f"cannot rebuild the router it describes ({e}); {fix}") from None
    tensors = read_checked_tensors(tensor_path, meta, fix)
    try:
        router.load_state_dict(tensors)
    except (RuntimeError, ValueError) as e:
        raise RunFileError(tensor_path, f"does not fit {config_path} ({e}); {fix}") from None
    return router.eval()


def route_stage(path: str | Path, preset: str | None = None, progress: bool = True,
                cfg: RouterConfig | None = None, search: str | None = None) -> dict:
    """Train the router of the run at `path`; write the router and RUN/router.json; return router.json.
    `cfg` defaults to the preset's RouterConfig; `search` ("exhaustive" or "greedy") overrides its search."""
    from .inference import StackedRun
    from .plots import plot_router

    t0 = time.time()
    sr = StackedRun(path, preset, router=False)
    run, model, tok, domains = sr.paths.run, sr.model, sr.tok, sr.domains
    cfg = cfg or sr.preset.router
    if search is not None:
        cfg = replace(cfg, search=search)
    torch.manual_seed(cfg.seed)
    singles = [ex for d in domains for ex in load_split(d, "val", sr.preset.data)[: cfg.prompts_per_domain]]
    singles = answerable(tok, singles, sr.preset.stack.seq_len)
    kinds = [k for k, labels in MIXED_KINDS.items() if set(labels) <= set(domains)]
    mixed = [m for m in mixed_prompts(sr.preset.data, "val", cfg.mixed_per_kind, seed=cfg.seed) if m.kind in kinds]

    oracle = oracle_targets(model, tok, singles, domains, sr.manifest, run, cfg, sr.preset.stack.seq_len)
    t_oracle = time.time() - t0
    D = len(domains)
    texts = [raw_prompt(ex) for ex in singles] + [m.text for m in mixed]
    features, mask = prompt_features(model, tok, texts, cfg)
    label = torch.tensor([domains.index(ex.domain) for ex in singles] + [-1] * len(mixed))
    label_set = torch.zeros(len(texts), D)
    for i, ex in enumerate(singles):
        label_set[i, domains.index(ex.domain)] = 1.0
    for i, m in enumerate(mixed, start=len(singles)):
        for d in m.labels:
            label_set[i, domains.index(d)] = 1.0
    targets = torch.cat([oracle.targets, label_set[len(singles):]])  # mixed prompts: their multi-hot labels
    data = RouterData(features, mask, targets, label, label_set)
    sources = [(ex.key(),) for ex in singles] + [tuple(m.sources) for m in mixed]
    train_rows, val_rows = group_split(sources, cfg.val_fraction, cfg.seed)
    train, val = data.subset(torch.tensor(train_rows)), data.subset(torch.tensor(val_rows))

    router = MetaRouter(features.shape[-1], domains, cfg)
    fit = train_router(router, train, val, cfg, progress=progress)
    save_router(run, router, model)

    # what the router does on the held-out prompts of each domain: mean p, and the set the rule switches on
    p_val = router.probabilities(val.features, val.mask)
    routes: dict[str, dict] = {}
    for d_i, d in enumerate(domains):
        rows = (val.label == d_i).nonzero().flatten().tolist()
        picked = [combo_name([x for x in domains if x in routing_weights(dict(zip(domains, p_val[r].tolist())), cfg)])
                  for r in rows]
        routes[d] = {"n": len(rows), "mean_p": p_val[rows].mean(0).tolist() if rows else [], "shares": shares(picked)}
    final = router_metrics(router, val, cfg)
    result = {
        "domains": list(domains),
        # against the oracle's targets, the quantities the router is trained on and selected by
        "single_top1": final["single_top1"],
        "mixed_set_match": final["mixed_set_match"],
        # against the prompts' domain labels: how often the router agrees with where a prompt came from
        "label_top1": final["label_top1"],
        "label_set_match": final["label_set_match"],
        "val_bce": final["bce"],
        "best_epoch": fit["best_epoch"],
        "history": fit["history"],
        "oracle": winning_shares(oracle.best, [ex.domain for ex in singles], domains),
        "oracle_by_search": searches_compared(oracle, [ex.domain for ex in singles], cfg),
        "oracle_chat_floor": oracle_floor(cfg, domains),
        "oracle_mean_loss": {combo_name(c): float(v.mean()) for c, v in oracle.losses.items()},
        "routes": routes,
        "n_prompts": {"single": len(singles), "mixed": len(mixed), "train": len(train_rows), "val": len(val_rows)},
        "mixed_kinds": kinds,
        "params": sum(p.numel() for p in router.parameters()),
        "search": cfg.search,
        "seconds": {"oracle": t_oracle, "total": time.time() - t0},
        "paper": {"oracle": PAPER_ORACLE},
        "files": {"router": str(run / ROUTER_DIR), "json": str(run / "router.json"), "plot": str(run / "router.png")},
    }
    atomic_write_json(run / "router.json", result)
    plot_router(result, run / "router.png")
    return result

