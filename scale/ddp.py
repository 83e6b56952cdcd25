"""Data-parallel stack training with torch.distributed DDP: the global batch split over processes.

    torchrun --nproc_per_node=2 -m scale.ddp --base FOLDER --out STACK.safetensors [--kind lora] [--steps 8]

gloo on the CPU, nccl on a GPU. This script only starts the processes and loads the base: the round is
ministacks' own `train_round` (its seeding, schedule, guard and checkpoints), which splits its batch over the
process group when there is one. Every process holds the whole frozen base (NF4 by default: QLoRA) and the
same fresh stack (the stack's own seed); each step, every process draws the same global batch of windows (a
pure function of the seed and the step: ministacks.lm.pretrain.window_starts), takes its share of the rows,
and runs `stack_step` through DDP, which averages the active stack's gradients over the processes before
AdamW. With an all-token loss every row has the same number of scored tokens, so the averaged gradient is
the one-process gradient of the global batch, and the stacks agree with a one-process run up to the order
of floating-point sums (tests/test_scale_ddp.py).

What differs from one process for MoE-LoRA: its routing noise is drawn per process for that process's rows,
and the load-balance loss is computed per process on its rows and averaged (a batch statistic of half the
batch is not half of the batch's statistic). Both are what the paper's training noise and balance term mean
per device; a single LoRA has neither.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from ministacks.data import load_split
from ministacks.presets import SMOKE
from ministacks.stacks.layer import AdapterConfig, active_parameters, make_adapter
from ministacks.training.examples import ExampleSet, PackedExamples, example_loss
from ministacks.training.sft import StackTrainConfig, train_round

from .bases import inject_stacks, load_base
from .tokens import PretrainedTokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="a Hugging Face model folder or hub id (with its tokenizer)")
    p.add_argument("--out", required=True, type=Path, help="where the first process writes the trained stack")
    p.add_argument("--kind", choices=["moe", "lora"], default="lora")
    p.add_argument("--quant", choices=["nf4", "none"], default="nf4")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4, help="the global batch, split over the processes")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--domain", default="chat", help="training examples of this embedded domain (smoke split)")
    p.add_argument("--grads", type=Path, help="also write the first step's gradients here (first process)")
    args = p.parse_args(argv)
    rank, size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun's
    device = f"cuda:{rank}" if torch.cuda.is_available() else "cpu"
    if size > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        model = load_base(args.base, quant=args.quant, device=device)
        inject_stacks(model)
        tok = PretrainedTokenizer.from_pretrained(args.base)
        train = PackedExamples(tok, load_split(args.domain, "train", SMOKE.data), completion_only=False,
                               seq_len=args.seq_len)
        # one validation pass, at the end: the round's guard then keeps the trained stack (or the identity)
        cfg = replace(StackTrainConfig(), steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                      lr=1e-2, warmup_steps=1, eval_every=args.steps)
        val = ExampleSet(tok, load_split(args.domain, "val", SMOKE.data)[:8], completion_only=False,
                         max_len=args.seq_len)
        grads: list = []

        def first_gradients(_model) -> None:  # after the first optimizer step: the gradients AdamW saw
            if not grads:
                grads.extend(p.grad.detach().clone() for p in active_parameters(model))

        train_round(model, make_adapter(args.kind, AdapterConfig(n_experts=4, r=2, lora_r=8)), train,
                    lambda: example_loss(model, val), cfg, progress=False, after_step=first_gradients)
        params = active_parameters(model)
        if rank == 0:
            from safetensors.torch import save_file

            save_file({f"p{i}": t.detach().cpu().contiguous() for i, t in enumerate(params)}, str(args.out))
            if args.grads is not None:
                save_file({f"p{i}": g.cpu().contiguous() for i, g in enumerate(grads)}, str(args.grads))
    finally:
        if size > 1:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
