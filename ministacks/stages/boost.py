"""`boost`: residual boosting on one domain (chat), the paper's inner loop in miniature, and its control.

Rounds of stack training, each a fresh MoE-LoRA stack on top of the frozen ones, until a round after
the first improves the validation loss by less than `BoostConfig.min_improvement` (0.002) or
`max_rounds` are trained: training/sft.py's `boost_domain`, the same loop the continual run uses.
Paper (TinyLlama, chat, docs/brainstacks.md §3): round 2 best (0.8531), round 3 worse.

The control the paper lacks: a second round may win only because it is more training. So one fresh
stack (stack 0 on a fresh base, exactly like round 1: the same seed, initialisation and data order)
trains for as many steps as all the rounds together ran, with the same StackTrainConfig otherwise
(learning rate, warmup then linear decay over its own steps, the guard on):

    control = train_round(fresh base, steps = Σ_rounds steps_run)

Boosting beats more training only if its best is below the control's.

Writes OUT/boost.json twice, so that a kill loses at most one part: first the rounds, then the rounds
with "control" added. A boost.json without "control" (killed during it, or written by an older
ministacks) trains the control alone; a boost.json with it is returned as it is.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..io import atomic_write_json, read_json
from ..presets import Preset
from ..report.paper import PAPER_BOOST
from ..report.plots import plot_boost
from ..run import prepared_base
from ..stacks.layer import make_adapter
from ..training.sft import boost_domain, train_round
from ..training.examples import example_loss
from .common import add_preset_args, add_quant_arg, domain_data, preset_of, writable_folder
from .pretrain import ensure_base

HELP = "residual boosting rounds on chat"


def boost_rounds(preset: Preset, out: Path, domain: str, progress: bool) -> dict:
    """The boosting rounds on a fresh base, as boost.json records them (without the control)."""
    model, tok = prepared_base(preset, out)
    train, val = domain_data(preset, tok, domain, preset.stack)
    # the loop the continual run uses, with its stop rule; each round's stack stays frozen in `model` under
    # `domain`, so round r trains on top of rounds 1..r-1: what makes the boosting residual
    rounds = boost_domain(model, domain, make_adapter("moe", preset.adapter), train,
                          lambda: example_loss(model, val), preset.stack, preset.boost, progress=progress)
    return {
        "domain": domain,
        "rounds": [r.to_dict() for r in rounds],
        "best": [r.best_loss for r in rounds],
        "stopped_after": len(rounds),
        "min_improvement": preset.boost.min_improvement,
        "paper": PAPER_BOOST,
    }


def boost_control(preset: Preset, out: Path, domain: str, steps: int, progress: bool) -> dict:
    """One fresh MoE-LoRA stack trained for `steps` steps on `domain`, otherwise as a boosting round.

    Stack 0 on a fresh base, like round 1, so it gets round 1's seed (training/sft.py's stack_seed): the same
    initialisation and data order, and only the length of its training (and so of its lr schedule) differs.
    The guard stays on, as in the rounds: it may stop the control before `steps` ("steps_run" says)."""
    cfg = replace(preset.stack, steps=steps)
    model, tok = prepared_base(preset, out)
    train, val = domain_data(preset, tok, domain, cfg)
    r = train_round(model, make_adapter("moe", preset.adapter), train, lambda: example_loss(model, val), cfg,
                    progress=progress, desc=f"{domain} control")
    return {"steps": steps, "steps_run": r.steps_run, "best_loss": r.best_loss, "best_step": r.best_step,
            "val_curve": r.val_curve, "stop_reason": r.stop_reason, "seconds_per_step": r.seconds_per_step,
            "seed": r.seed}


def run_boost(preset: Preset, out: str | Path, progress: bool = True, domain: str = "chat") -> dict:
    out = Path(out)
    ensure_base(preset, out, progress)
    path = out / "boost.json"
    result = read_json(path) if path.is_file() else None
    if result is not None and "control" in result:  # both parts ran: a finished boost.json is the result
        return result
    if result is None:
        result = boost_rounds(preset, out, domain, progress)
        atomic_write_json(path, result)  # the rounds are kept if the control is interrupted
    # as many steps as the rounds ran, not max_rounds × steps: a round the guard stopped early counts
    # only the steps it took, so the control never gets more training than boosting had
    total = sum(r["steps_run"] for r in result["rounds"])
    result["control"] = boost_control(preset, out, result["domain"], total, progress)
    atomic_write_json(path, result)
    plot_boost(result, out / "boost.png")
    return result


def add_args(p) -> None:
    add_preset_args(p, "runs/demo")
    add_quant_arg(p, None, "base precision under the stacks (default: the preset's, fp32 — faster on the CPU)")


def main(args) -> int:
    writable_folder(args.out)
    b = run_boost(preset_of(args), args.out, progress=not args.no_progress)
    c = b["control"]
    print("best validation loss per round: " + ", ".join(f"{v:.4f}" for v in b["best"]))
    print(f"control, one stack for the rounds' {c['steps']} steps: best {c['best_loss']:.4f}")
    print(f"wrote {Path(args.out) / 'boost.json'} and {Path(args.out) / 'boost.png'}")
    return 0
