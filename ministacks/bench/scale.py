"""`bench scale`: a training step of our stacks against peft's LoRA, on the same real 4-bit base and batch.

On NF4 SmolLM2-135M-Instruct (scale/smollm2.py, the CPU scale path's base), in one process, interleaved
(timing.py), three variants of one stack-training step — forward, loss, backward, clip, AdamW — on all seven
projections of every layer:

    moe    our MoE-LoRA, the paper's 4 experts x rank 16, top-2 (loss + λ x the load-balance loss)
    lora   our single LoRA of rank 64, the paper's parameter-matched baseline
    peft   peft's LoRA of rank 64 (rsLoRA, no dropout): the library a user would pick instead

and the ratios moe / peft and lora / peft (the goal: MoE-LoRA within 1.15x of peft's LoRA). Our LoRA and
peft's give the same logits given the same weights (tests/test_scale_peft.py), so `lora / peft` is the cost of
our wrapping alone, and `moe / lora` what the routing adds.
"""

from __future__ import annotations

import torch

from ..stacks.layer import TARGET_MODULES, AdapterConfig, add_stack, make_adapter
from ..training.sft import StackTrainConfig, stack_step
from .timing import busy_machine, load_average, time_interleaved

GOAL = 1.15  # MoE-LoRA's step within this factor of peft's LoRA


def bench_scale(batch_size: int = 4, seq_len: int = 128, rounds: int = 8, budget_s: float = 120.0,
                seed: int = 0, path=None) -> dict:
    from peft import LoraConfig, get_peft_model

    from scale.bases import inject_stacks, load_base
    from scale.smollm2 import smollm2_checkpoint

    load = load_average()
    path = path or smollm2_checkpoint()
    cfg = AdapterConfig()  # the paper's literal shape: 4 x r16 top-2, and LoRA r64
    torch.manual_seed(seed)
    variants = {}
    for kind in ("moe", "lora"):
        model = load_base(path, quant="nf4", device="cpu")
        inject_stacks(model)
        variants[kind] = (model, add_stack(model, make_adapter(kind, cfg)))
    model = get_peft_model(load_base(path, quant="nf4", device="cpu"),
                           LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                      target_modules=list(TARGET_MODULES), use_rslora=cfg.use_rslora))
    variants["peft"] = (model, [p for p in model.parameters() if p.requires_grad])
    vocab = variants["peft"][0].config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))

    # ministacks' own step for all three (loss + aux_weight x the load-balance loss, which is zero without
    # MoE-LoRA layers; clip; AdamW)
    train = StackTrainConfig(batch_size=batch_size, seq_len=seq_len, lr=1e-4)
    fns = {}
    for kind, (model, params) in variants.items():
        model.train()
        opt = torch.optim.AdamW(params, lr=train.lr)
        fns[kind] = lambda model=model, params=params, opt=opt: stack_step(model, params, opt, ids, ids, train)
    timings = time_interleaved(fns, rounds, warmup=1, budget_s=budget_s, rotate=True)
    ms = {k: v * 1e3 for k, v in timings.median.items()}
    busy = busy_machine(timings.spread.values(), load)
    return {
        "base": "SmolLM2-135M-Instruct, NF4 (double quantization), fp32 compute",
        "batch_size": batch_size, "seq_len": seq_len, "rounds": timings.rounds, "threads": torch.get_num_threads(),
        "ms": ms, "spread": timings.spread, "load_average": load,
        "params": {k: sum(p.numel() for p in params) for k, (_, params) in variants.items()},
        "moe_over_peft": ms["moe"] / ms["peft"], "lora_over_peft": ms["lora"] / ms["peft"],
        "moe_over_lora": ms["moe"] / ms["lora"], "goal": GOAL, "busy": busy._asdict(),
    }


def format_bench_scale(d: dict) -> str:
    ms, n = d["ms"], d["params"]
    met = "within" if d["moe_over_peft"] <= d["goal"] else "not within"
    lines = [
        f"A stack-training step on {d['base']}: batch {d['batch_size']} x {d['seq_len']} tokens, "
        f"{d['rounds']} interleaved rounds, {d['threads']} threads, medians",
        f"  ours, MoE-LoRA 4 x r16 top-2  {ms['moe']:8.0f} ms   {n['moe']:>11,} trainable",
        f"  ours, LoRA r64                {ms['lora']:8.0f} ms   {n['lora']:>11,} trainable",
        f"  peft, LoRA r64                {ms['peft']:8.0f} ms   {n['peft']:>11,} trainable",
        f"  MoE-LoRA / peft {d['moe_over_peft']:.2f}x ({met} the goal of {d['goal']:.2f}x); our LoRA / peft "
        f"{d['lora_over_peft']:.2f}x; MoE-LoRA / our LoRA {d['moe_over_lora']:.2f}x",
    ]
    b = d["busy"]
    if b.get("spread") or b.get("load"):
        lines.append(f"  the cores were busy (spread {b.get('spread')}, load {b.get('load')}): the ratios are unreliable")
    return "\n".join(lines)
