"""`psn`: the paper's PSN boundary experiment (docs/brainstacks.md §8), variant v1, at mini scale.

v1: Brainstacks from random initialisation. The continual run — MoE-LoRA stacks domain after domain with
null-space projection, the preset's domains, rounds and steps — on a base that was never pretrained, beside
the same run on the pretrained base:

    OUT/psn/random/        the random base: the very network pretraining started from (Transformer(cfg) under
                           the pretraining seed, so the same initial weights), never trained, the same tokenizer
                           (copied from OUT, so both runs read the same tokens), and its continual run
    OUT/nullspace/         the continual run on the pretrained base (the demo's, reused when it is there)
    OUT/psn.json, psn.png  per domain: the loss before its first stack and after its last (the stacks' own
                           gain), both forgetting matrices, and a greedy answer per domain from each run

The paper's v1 (a GPT-2-size model, six domains) converges per domain but answers poorly: LoRA corrections
refine a pretrained geometry and cannot stand in for one. What v1 measures here is how far each domain's
stacks bring a random base against how far they bring a pretrained one, on the same losses.

v2: capability blocks (psn/blocks.py) over a base pretrained on the general corpus alone (OUT/psn/v2: the
preset's pretraining with no templated domain examples), one block per domain in order, each kept out of the
earlier blocks' output directions (psn/train.py), saved as OUT/psn/v2/blocks/DOMAIN.safetensors as it is
trained (a rerun loads the finished ones). On each domain's test split: the oracle gain, the loss without
any block minus the loss with the domain's own block (the paper: +2.4 to +5.2 nats); and the analogue of the
paper's Figure 12, a code prompt answered with and without the code block; and the meta-router over the
blocks (`block_router`: the route stage's oracle and training, the blocks switched in place of stacks), its
single-domain top-1 and mixed-prompt set match on held-out prompts (the paper: 100% and 100%).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..data import load_split, raw_prompt
from ..io import atomic_save_tensors, atomic_write_bytes, atomic_write_json, load_tensors, read_json
from ..lm.base import has_base, load_base, save_base
from ..lm.model import Transformer
from ..lm.tokenizer import Tokenizer
from ..presets import Preset, raw_text_base, with_vocab
from ..report.paper import PAPER_PSN
from ..psn.model import PSNModel, blocks_on
from ..psn.train import block_directions, train_block, united_basis
from ..report.psn import plot_psn, plot_psn_v2
from ..routing.oracle import ComboLosses, find_targets, oracle_floor, winning_shares
from ..run import load_run
from ..stacks.layer import StacksOn
from ..training.examples import ExampleSet, example_loss
from .common import add_preset_args, domain_data, preset_of, writable_folder
from .continual import run_continual
from .pretrain import ensure_base
from .route import fit_router, router_prompts

HELP = "PSN: stacks on a random base beside a pretrained one (v1); capability blocks (v2)"
RANDOM = Path("psn") / "random"


def random_preset(preset: Preset) -> Preset:
    """The preset of the random base's run: no pretraining steps (the run records the base it was trained on)."""
    return replace(preset, pretrain=replace(preset.pretrain, steps=0))


def write_random_base(preset: Preset, out: Path, folder: Path) -> None:
    """`folder`/base: Transformer(cfg) as pretraining initialises it (the same seed), with `out`'s tokenizer."""
    if has_base(folder):
        return
    tok_path = out / "tokenizer.json"
    atomic_write_bytes(folder / "tokenizer.json", tok_path.read_bytes())
    tok = Tokenizer.load(folder / "tokenizer.json")
    cfg = with_vocab(preset, tok.vocab_size).model
    torch.manual_seed(preset.pretrain.seed)  # pretraining's own seed: the weights it started from
    model = Transformer(cfg)
    save_base(folder, model, {"model": cfg.to_dict(), "tokenizer": tok.fingerprint(),
                              "pretrain": asdict(random_preset(preset).pretrain)})


def run_summary(run: Path, manifest: dict, domains: tuple[str, ...] | None = None) -> dict:
    """Per domain: the loss before its first stack and after its last, the forgetting matrix, a greedy answer.

    `domains`: the run's first few (a run that went on past them is summarised as it stood after them: the
    top-left block of its forgetting matrix, and answers with those domains' stacks alone on)."""
    domains = list(domains or manifest["domains"])
    if manifest["domains"][: len(domains)] != domains:
        raise ValueError(f"{run}: its domains {manifest['domains']} do not begin with {domains}")
    first = {d: next(s for s in manifest["stacks"] if s["domain"] == d) for d in domains}
    last = {d: [s for s in manifest["stacks"] if s["domain"] == d][-1] for d in domains}
    sr = load_run(run, router=False)
    on = StacksOn.weighted({d: 1.0 for d in domains})  # every one of them on, as ungated is over a whole run
    samples = {}
    for d in domains:  # the first validation prompt of each domain, greedy
        ex = load_split(d, "val", sr.preset.data)[0]
        gen = sr.generate(raw_prompt(ex), on, max_new_tokens=48, prompt=ex.prompt(),
                          repetition_penalty=sr.preset.eval.repetition_penalty)
        samples[d] = {"prompt": raw_prompt(ex), "reference": ex.response, "answer": gen["completion"]}
    n = len(domains)
    return {"run": str(run), "domains": domains,
            "before": {d: first[d]["pre_loss"] for d in domains}, "after": {d: last[d]["best_loss"] for d in domains},
            "forgetting": [row[:n] for row in manifest["forgetting"]["matrix"][:n]], "samples": samples}


def leading(preset: Preset, domains: tuple[str, ...] | None) -> tuple[str, ...]:
    """`domains`, checked to be the first few of the preset's curriculum (None: all of it)."""
    order = tuple(preset.continual.domains)
    if domains is None:
        return order
    if not domains or order[: len(domains)] != tuple(domains):
        raise ValueError(f"PSN runs the curriculum's first domains in order: {domains} does not begin {order}")
    return tuple(domains)


def psn_v1(preset: Preset, out: str | Path, progress: bool = True, domains: tuple[str, ...] | None = None,
           folder: str | Path | None = None) -> dict:
    """Both continual runs (each resumes, or is reused when finished), then OUT/psn.json and psn.png.

    `domains`: the curriculum's first few only (the demo's short stage), the random base's run in `folder`
    (default OUT/psn/random); the pretrained side is OUT/nullspace as it stood after them."""
    out = Path(out)
    domains = leading(preset, domains)
    ensure_base(preset, out, progress)
    folder = Path(folder) if folder is not None else out / RANDOM
    write_random_base(preset, out, folder)
    short = replace(preset, continual=replace(preset.continual, domains=domains))
    random_run = run_continual(random_preset(short), folder, folder, progress)
    pretrained_run = run_continual(preset, out, out / "nullspace", progress)
    result = {"v1": {"random": run_summary(folder, random_run),
                     "pretrained": run_summary(out / "nullspace", pretrained_run, domains)}, "paper": PAPER_PSN}
    path = out / "psn.json"
    previous = read_json(path) if path.is_file() else {}
    atomic_write_json(path, {**previous, **result})
    plot_psn(result["v1"], out / "psn.png")
    return result


V2 = Path("psn") / "v2"


def general_preset(preset: Preset) -> Preset:
    """v2's base: the preset's pretraining on the general corpus alone (no Alpaca-formatted domain examples)."""
    return raw_text_base(preset)


def psn_v2(preset: Preset, out: str | Path, progress: bool = True, domains: tuple[str, ...] | None = None,
           folder: str | Path | None = None, own_base: bool = False) -> dict:
    """The blocks in order (each resumed from its file when trained), the oracle gains, Figure 12's analogue.

    `domains`: the curriculum's first few only, the blocks in `folder` (default OUT/psn/v2). `own_base`: the
    blocks over OUT's base as it is (the demo's short stage: no second pretraining) instead of v2's base
    pretrained on general text alone; psn.json says which."""
    out = Path(out)
    domains = leading(preset, domains)
    folder, cfg = Path(folder) if folder is not None else out / V2, preset.psn
    gp = preset if own_base else general_preset(preset)
    # a preset that pretrains on general text alone already (smoke) has v2's base in OUT: no second pretraining
    base_folder = out if gp.pretrain == preset.pretrain else folder
    ensure_base(gp, base_folder, progress)
    base, tok = load_base(base_folder)
    model = PSNModel(base.eval())
    record_path = folder / "blocks.json"
    blocks = read_json(record_path) if record_path.is_file() else {}
    directions = []
    for i, domain in enumerate(domains):
        train, val = domain_data(gp, tok, domain, preset.stack)
        basis = united_basis(directions, base.cfg.d_model)
        path = folder / "blocks" / f"{domain}.safetensors"
        if domain in blocks and path.is_file():  # trained before: the same block, the same basis
            block = model.add_block(domain, cfg)
            block.basis = basis
            block.load_state_dict(load_tensors(path))
        else:
            blocks[domain] = train_block(model, domain, train, val, cfg, basis, seed=i, progress=progress)
            atomic_save_tensors(path, {k: v.contiguous() for k, v in model.blocks[domain].state_dict().items()})
            atomic_write_json(record_path, blocks)  # the record after the file: a record always has its block
        directions.append(block_directions(model, domain, val, cfg.ns_k))
    oracle = {}
    for domain in domains:  # on the test split, which no block was trained or chosen on
        test = ExampleSet(tok, load_split(domain, "test", gp.data)[: preset.eval.n_loss], preset.stack.completion_only,
                          base.cfg.max_seq_len)
        model.weights = {}
        without = example_loss(model, test)
        model.weights = {domain: 1.0}
        with_block = example_loss(model, test)
        oracle[domain] = {"without": without, "with": with_block, "gain": without - with_block, "n": len(test.scored)}
    result = {"domains": list(domains), "blocks": {d: blocks[d] for d in domains}, "oracle": oracle,
              "template_share": gp.pretrain.template_share,
              "figure12": figure12(model, tok, gp) if "code" in model.blocks else None,
              "router": block_router(model, tok, gp, progress), "base": str(base_folder)}
    path = out / "psn.json"
    previous = read_json(path) if path.is_file() else {}
    atomic_write_json(path, {**previous, "v2": result, "paper": PAPER_PSN})
    plot_psn_v2(result, out / "psn_v2.png")
    return result


def block_router(model: PSNModel, tok, preset: Preset, progress: bool = True) -> dict:
    """The meta-router over the blocks, as `route` trains it over stacks (stages/route.py's fit_router): the
    oracle tries every combination of blocks on each validation answer (blocks_on switches them as StacksOn
    says, chat at its inference floor), the router learns those outcomes and the mixed prompts' labels from
    the frozen base's features. Returns its scores on held-out prompts and the oracle's winning combinations."""
    cfg, domains = preset.router, tuple(model.blocks)
    torch.manual_seed(cfg.seed)
    singles, mixed, kinds = router_prompts(tok, domains, preset, cfg)  # the prompts `route` learns from
    data = ExampleSet(tok, singles, completion_only=True, max_len=preset.stack.seq_len)
    labels = [ex.domain for ex in singles]
    oracle = find_targets(ComboLosses(model, data, oracle_floor(cfg, domains), switch=blocks_on), labels, domains, cfg)
    _, fit = fit_router(model.base, tok, domains, singles, mixed, oracle, cfg, progress)
    final = fit["final"]
    return {"single_top1": final["single_top1"], "mixed_set_match": final["mixed_set_match"],
            "label_top1": final["label_top1"], "label_set_match": final["label_set_match"],
            "best_epoch": fit["best_epoch"], "n_prompts": fit["n_prompts"], "mixed_kinds": kinds,
            "oracle": winning_shares(oracle.best, labels, domains)}


def figure12(model: PSNModel, tok, preset: Preset) -> dict:
    """The paper's Figure 12: a code prompt answered by the base alone and with the code block (greedy)."""
    ex = load_split("code", "test", preset.data)[0]
    ids = torch.tensor([tok.encode(ex.prompt(), bos=True)])
    room = min(64, model.cfg.max_seq_len - ids.shape[1])
    answers = {}
    for name, weights in (("without", {}), ("with the code block", {"code": 1.0})):
        model.weights = weights
        out = model.generate(ids, room, eos_id=tok.eos_id, repetition_penalty=preset.eval.repetition_penalty)
        answers[name] = tok.decode([t for t in out[0, ids.shape[1]:].tolist() if t != tok.eos_id])
    return {"prompt": raw_prompt(ex), "reference": ex.response, "answers": answers}


def add_args(p) -> None:
    add_preset_args(p, "runs/demo")
    p.add_argument("--variant", choices=["v1", "v2"], default="v1",
                   help="v1: stacks on a randomly initialised base beside the pretrained one; v2: capability "
                        "blocks over a base pretrained on the general corpus alone")


def main(args) -> int:
    out = writable_folder(args.out)
    if args.variant == "v2":
        r2 = psn_v2(preset_of(args), out, progress=not args.no_progress)
        print("oracle gain per domain (test loss without any block − with the domain's own block):")
        for d, o in r2["oracle"].items():
            print(f"  {d:10s} {o['without']:.3f} − {o['with']:.3f} = {o['gain']:+.3f} nats")
        print(f"wrote {out / 'psn.json'} and {out / 'psn_v2.png'}")
        return 0
    r = psn_v1(preset_of(args), out, progress=not args.no_progress)["v1"]
    print("validation loss per domain, before its first stack -> after its last (all earlier stacks on):")
    for d in r["random"]["domains"]:
        print(f"  {d:10s} random base {r['random']['before'][d]:.3f} -> {r['random']['after'][d]:.3f}   "
              f"pretrained base {r['pretrained']['before'][d]:.3f} -> {r['pretrained']['after'][d]:.3f}")
    print(f"wrote {out / 'psn.json'} and {out / 'psn.png'}")
    return 0
