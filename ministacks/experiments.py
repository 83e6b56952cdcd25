"""The paper's single-domain experiments in miniature, on our pretrained base (spec §9).

- `run_compare` — Experiment 1: MoE-LoRA (4 experts × rank 16, top-2) against the parameter-matched
  single LoRA (rank 64) on the chat domain, same steps, learning rate, data order and seed, on the
  frozen (by default 4-bit) base. Paper (TinyLlama): MoE 0.872 vs LoRA 0.874, MoE ahead at every
  checkpoint, 2.1× slower per step — ours should be about as fast as the LoRA.
- `run_boost` — residual boosting on chat: rounds until one improves by less than 0.002. Paper:
  round 2 best (0.8531), round 3 worse.

Both load the base from the run folder (pretraining it first if it is not there) and write JSON + a
figure; both skip work already recorded in their JSON when run again.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .data import load_split
from .io import atomic_write_json, read_json
from .plots import plot_boost, plot_compare
from .pretrain import check_run_folder, load_base
from .stacks import inject_stacks, make_adapter
from .train import ExampleSet, PackedExamples, boost_domain, example_loss, train_round

if TYPE_CHECKING:  # presets.py imports the configs of modules that import this one
    from .presets import Preset

PAPER_EXP1 = {  # spec §9: TinyLlama-1.1B 4-bit, alpaca, val loss every 50 steps
    "steps": [50, 100, 150, 200, 250, 300, 350, 400],
    "moe": [0.9131, 0.8946, 0.8876, 0.8812, 0.8779, 0.8745, 0.8724, 0.8715],
    "lora": [0.9194, 0.9127, 0.9045, 0.8960, 0.8891, 0.8823, 0.8766, 0.8741],
    "params": {"moe": 53.6e6, "lora": 50.5e6},
    "minutes": {"moe": 20.2, "lora": 9.5},
}
PAPER_BOOST = {"round2_best": 0.8531, "note": "round 2 best; round 3 was worse (TinyLlama, chat)"}


def ensure_base(preset: Preset, out: Path, progress: bool) -> None:
    if not (out / "base" / "model.safetensors").is_file():
        from .pipeline import stage_pretrain

        stage_pretrain(preset, out, progress=progress)


def prepared_base(preset: Preset, out: Path):
    """The frozen base with every projection wrapped (and quantized to NF4 first if the preset says so).

    Checked on the way: the base's files against their checksums and the tokenizer against the base
    (`load_base`), and the tokenizer against the stacks of every run in `out` (`check_run_folder`)."""
    model, tok = load_base(out)
    check_run_folder(out, tok)
    if preset.quant == "nf4":
        from .quant import quantize_model

        quantize_model(model)
    inject_stacks(model)
    return model, tok


def domain_val(preset: Preset, tok, domain: str, cfg) -> ExampleSet:
    """The domain's first `cfg.max_val_examples` validation examples, tokenised for `example_loss`."""
    return ExampleSet(tok, load_split(domain, "val", preset.data)[: cfg.max_val_examples], cfg.completion_only,
                      max_len=cfg.seq_len, batch_size=cfg.eval_batch_size)


def domain_data(preset: Preset, tok, domain: str, cfg) -> tuple[PackedExamples, ExampleSet]:
    train = PackedExamples(tok, load_split(domain, "train", preset.data), cfg.completion_only, cfg.seq_len)
    return train, domain_val(preset, tok, domain, cfg)


def run_compare(preset: Preset, out: str | Path, progress: bool = True, domain: str = "chat") -> dict:
    out = Path(out)
    ensure_base(preset, out, progress)
    path = out / "compare.json"
    result = read_json(path) if path.is_file() else {"domain": domain, "quant": preset.quant}
    cfg = replace(preset.stack, guard=False)  # Exp 1 compares whole curves: no early stop
    for kind in ("moe", "lora"):
        if kind in result:
            continue
        model, tok = prepared_base(preset, out)
        train, val = domain_data(preset, tok, domain, cfg)
        r = train_round(model, make_adapter(kind, preset.adapter), train, lambda: example_loss(model, val), cfg,
                        progress=progress, desc=f"compare {kind}")
        # each arm is the first stack on a fresh base: the same stack seed, so the same data order
        result[kind] = {"params": r.params, "val_curve": r.val_curve, "seconds_per_step": r.seconds_per_step,
                        "final": r.val_curve[-1][1], "best": r.best_loss, "seed": r.seed}
        atomic_write_json(path, result)  # each finished arm is kept if the other is interrupted
    result["paper"] = PAPER_EXP1
    result["speed_ratio_moe_over_lora"] = result["moe"]["seconds_per_step"] / result["lora"]["seconds_per_step"]
    atomic_write_json(path, result)
    plot_compare(result, out / "compare.png")
    return result


def run_boost(preset: Preset, out: str | Path, progress: bool = True, domain: str = "chat") -> dict:
    out = Path(out)
    ensure_base(preset, out, progress)
    path = out / "boost.json"
    if path.is_file():
        return read_json(path)
    model, tok = prepared_base(preset, out)
    train, val = domain_data(preset, tok, domain, preset.stack)
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
