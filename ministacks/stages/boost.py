"""`boost`: residual boosting on one domain (chat), the paper's inner loop in miniature.

Rounds of stack training, each a fresh MoE-LoRA stack on top of the frozen ones, until a round after
the first improves the validation loss by less than `BoostConfig.min_improvement` (0.002) or
`max_rounds` are trained: training/sft.py's `boost_domain`, the same loop the continual run uses.
Paper (TinyLlama, chat, docs/brainstacks.md §3): round 2 best (0.8531), round 3 worse.

Writes OUT/boost.json and boost.png; a finished boost.json is returned as it is.
"""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_write_json, read_json
from ..presets import Preset
from ..report.paper import PAPER_BOOST
from ..report.plots import plot_boost
from ..run import prepared_base
from ..stacks.layer import make_adapter
from ..training.sft import boost_domain
from ..training.examples import example_loss
from .common import add_preset_args, add_quant_arg, domain_data, preset_of, writable_folder
from .pretrain import ensure_base

HELP = "residual boosting rounds on chat"


def run_boost(preset: Preset, out: str | Path, progress: bool = True, domain: str = "chat") -> dict:
    out = Path(out)
    ensure_base(preset, out, progress)
    path = out / "boost.json"
    if path.is_file():  # boosting runs as one unit: a finished boost.json is the result
        return read_json(path)
    model, tok = prepared_base(preset, out)
    train, val = domain_data(preset, tok, domain, preset.stack)
    # the loop the continual run uses, with its stop rule; each round's stack stays frozen in `model` under
    # `domain`, so round r trains on top of rounds 1..r-1: what makes the boosting residual
    rounds = boost_domain(model, domain, make_adapter("moe", preset.adapter), train,
                          lambda: example_loss(model, val), preset.stack, preset.boost, progress=progress)
    result = {
        "domain": domain,
        "rounds": [r.to_dict() for r in rounds],
        "best": [r.best_loss for r in rounds],
        "stopped_after": len(rounds),
        "min_improvement": preset.boost.min_improvement,
        "paper": PAPER_BOOST,
    }
    atomic_write_json(path, result)
    plot_boost(result, out / "boost.png")
    return result


def add_args(p) -> None:
    add_preset_args(p, "runs/demo")
    add_quant_arg(p, None, "base precision under the stacks (default: the preset's, fp32 — faster on the CPU)")


def main(args) -> int:
    writable_folder(args.out)
    b = run_boost(preset_of(args), args.out, progress=not args.no_progress)
    print("best validation loss per round: " + ", ".join(f"{v:.4f}" for v in b["best"]))
    print(f"wrote {Path(args.out) / 'boost.json'} and {Path(args.out) / 'boost.png'}")
    return 0
