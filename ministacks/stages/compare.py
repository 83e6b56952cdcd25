"""`compare`: the paper's Experiment 1 in miniature — MoE-LoRA against the parameter-matched single LoRA.

MoE-LoRA (4 experts × rank 16, top-2) and a single LoRA of rank 64 (the same parameter count) each
train one stack on the chat domain: the same steps, learning rate, data order and seed, on the frozen
(by default 4-bit, as in the paper) base, with no early stop, so the whole validation curves compare.
Paper (TinyLlama, docs/brainstacks.md §9): MoE 0.872 vs LoRA 0.874, MoE ahead at every checkpoint,
2.1× slower per step; ours should be about as fast as the LoRA (bench moe measures why).

Writes OUT/compare.json and compare.png; an arm already in compare.json is not trained again. With
`--steps N` both arms train N steps on the paper's schedule (a tenth of them warmup, 8 checkpoints: the
paper's 400 steps are 40 + checkpoints every 50) into OUT/compare_N.json and compare_N.png, beside the
preset's own comparison.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from ..io import atomic_write_json, read_json
from ..lm.base import is_pretrained
from ..presets import Preset
from ..report.findings import exp1_checkpoints
from ..report.paper import PAPER_EXP1, PAPER_STACK_SHARE
from ..report.plots import plot_compare
from ..run import prepared_base
from ..stacks.layer import make_adapter
from ..stacks.proportions import projection_shapes
from ..training.sft import train_round
from ..training.examples import example_loss
from .common import add_preset_args, add_quant_arg, domain_data, preset_of, writable_folder
from .pretrain import ensure_base

HELP = "Experiment 1: MoE-LoRA vs the parameter-matched single LoRA"


def at_length(preset: Preset, steps: int) -> Preset:
    """The preset with Exp 1's rounds `steps` long, on the paper's schedule: a tenth of them warmup and a
    validation every steps // 8 (8 checkpoints where 8 divides `steps`; the paper: 400 steps, 40 warmup,
    every 50)."""
    if steps < 8:
        raise ValueError(f"--steps {steps}: Exp 1 needs at least 8 steps, one per checkpoint")
    return replace(preset, stack=replace(preset.stack, steps=steps, eval_every=steps // 8, warmup_steps=max(1, steps // 10)))


def run_compare(preset: Preset, out: str | Path, progress: bool = True, domain: str = "chat",
                name: str = "compare") -> dict:
    """Exp 1 into OUT/NAME.json and NAME.png (NAME: compare, or compare_N for `--steps N`)."""
    out = Path(out)
    ensure_base(preset, out, progress)
    path = out / f"{name}.json"
    # resumable per arm: an arm already in the file is kept, and only the other one is trained
    result = read_json(path) if path.is_file() else {"domain": domain, "quant": preset.quant}
    cfg = replace(preset.stack, guard=False)  # Exp 1 compares whole curves: no early stop
    result["steps"] = cfg.steps
    for kind in ("moe", "lora"):
        if kind in result:
            continue
        # each arm on a fresh base: both are stack 0, so they get the same stack seed and data order
        model, tok = prepared_base(preset, out)
        # the base's parameters as trained (fp32), not as stored: NF4 packs two weights per byte
        result["base_params"] = model.num_params() if is_pretrained(out) else projection_shapes(model.cfg)[0]
        train, val = domain_data(preset, tok, domain, cfg)
        r = train_round(model, make_adapter(kind, preset.adapter), train, lambda: example_loss(model, val), cfg,
                        progress=progress, desc=f"compare {kind}")
        result[kind] = {"params": r.params, "val_curve": r.val_curve, "seconds_per_step": r.seconds_per_step,
                        "final": r.val_curve[-1][1], "best": r.best_loss, "seed": r.seed}
        atomic_write_json(path, result)  # each finished arm is kept if the other is interrupted
    result["paper"] = PAPER_EXP1
    # the stacks' size against the base, beside the paper's (stacks/proportions.py): what the miniature keeps
    result["adapter"] = asdict(preset.adapter)
    result["stack_share"] = {kind: result[kind]["params"] / result["base_params"] for kind in ("moe", "lora")}
    result["paper_stack_share"] = PAPER_STACK_SHARE
    # the paper's cost (MoE 2.1x slower per step), measured here on the same steps on the same machine
    result["speed_ratio_moe_over_lora"] = result["moe"]["seconds_per_step"] / result["lora"]["seconds_per_step"]
    atomic_write_json(path, result)
    plot_compare(result, out / f"{name}.png")
    return result


def add_args(p) -> None:
    add_preset_args(p, "runs/demo")
    add_quant_arg(p, "nf4", "base precision under the stacks (default nf4: the paper's 4-bit setting for Exp 1)")
    p.add_argument("--steps", type=int, default=None,
                   help="train both arms this many steps on the paper's schedule (the paper: 400), into "
                        "OUT/compare_STEPS.json beside the preset's own comparison (default: the preset's steps)")


def main(args) -> int:
    preset, name = preset_of(args), "compare"
    if args.steps is not None:
        preset, name = at_length(preset, args.steps), f"compare_{args.steps}"
    writable_folder(args.out)
    c = run_compare(preset, args.out, progress=not args.no_progress, name=name)
    row = exp1_checkpoints(c)
    print(f"{c['steps']} steps: MoE-LoRA below LoRA at {row['ours']} (the paper: {row['paper']}; {row['verdict']}); "
          f"final validation loss MoE-LoRA {c['moe']['final']:.4f}, LoRA {c['lora']['final']:.4f}; "
          f"MoE/LoRA step time {c['speed_ratio_moe_over_lora']:.2f}x")
    print(f"wrote {Path(args.out) / (name + '.json')} and {Path(args.out) / (name + '.png')}")
    return 0
