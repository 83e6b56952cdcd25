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

Variant v2 (capability blocks over a base pretrained on the general corpus alone) is not built yet.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..data import load_split, raw_prompt
from ..io import atomic_write_bytes, atomic_write_json, read_json
from ..lm.base import has_base, save_base
from ..lm.model import Transformer
from ..lm.tokenizer import Tokenizer
from ..presets import Preset, with_vocab
from ..report.paper import PAPER_PSN
from ..report.psn import plot_psn
from ..run import load_run
from .common import add_preset_args, preset_of, writable_folder
from .continual import run_continual
from .pretrain import ensure_base

HELP = "PSN v1: the continual run on a randomly initialised base, beside the pretrained one"
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


def _summary(run: Path, manifest: dict) -> dict:
    """Per domain: the loss before its first stack and after its last, the forgetting matrix, a greedy answer."""
    domains = manifest["domains"]
    first = {d: next(s for s in manifest["stacks"] if s["domain"] == d) for d in domains}
    last = {d: [s for s in manifest["stacks"] if s["domain"] == d][-1] for d in domains}
    sr = load_run(run, router=False)
    samples = {}
    for d in domains:  # the first validation prompt of each domain, all stacks on (ungated), greedy
        ex = load_split(d, "val", sr.preset.data)[0]
        gen = sr.generate(raw_prompt(ex), "ungated", max_new_tokens=48, prompt=ex.prompt(),
                          repetition_penalty=sr.preset.eval.repetition_penalty)
        samples[d] = {"prompt": raw_prompt(ex), "reference": ex.response, "answer": gen["completion"]}
    return {"run": str(run), "domains": domains,
            "before": {d: first[d]["pre_loss"] for d in domains}, "after": {d: last[d]["best_loss"] for d in domains},
            "forgetting": manifest["forgetting"]["matrix"], "samples": samples}


def psn_v1(preset: Preset, out: str | Path, progress: bool = True) -> dict:
    """Both continual runs (each resumes, or is reused when finished), then OUT/psn.json and psn.png."""
    out = Path(out)
    ensure_base(preset, out, progress)
    folder = out / RANDOM
    write_random_base(preset, out, folder)
    random_run = run_continual(random_preset(preset), folder, folder, progress)
    pretrained_run = run_continual(preset, out, out / "nullspace", progress)
    result = {"v1": {"random": _summary(folder, random_run), "pretrained": _summary(out / "nullspace", pretrained_run)},
              "paper": PAPER_PSN}
    path = out / "psn.json"
    previous = read_json(path) if path.is_file() else {}
    atomic_write_json(path, {**previous, **result})
    plot_psn(result["v1"], out / "psn.png")
    return result


def add_args(p) -> None:
    add_preset_args(p, "runs/demo")
    p.add_argument("--variant", choices=["v1"], default="v1",
                   help="v1: stacks on a randomly initialised base beside the pretrained one (v2 is not built yet)")


def main(args) -> int:
    out = writable_folder(args.out)
    r = psn_v1(preset_of(args), out, progress=not args.no_progress)["v1"]
    print("validation loss per domain, before its first stack -> after its last (all earlier stacks on):")
    for d in r["random"]["domains"]:
        print(f"  {d:10s} random base {r['random']['before'][d]:.3f} -> {r['random']['after'][d]:.3f}   "
              f"pretrained base {r['pretrained']['before'][d]:.3f} -> {r['pretrained']['after'][d]:.3f}")
    print(f"wrote {out / 'psn.json'} and {out / 'psn.png'}")
    return 0
