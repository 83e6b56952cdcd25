"""The `bench` command: `python -m ministacks bench {pretrain,moe,nf4,nullspace,route,scale,engine} [--json]`.

Each benchmark runs for about a minute and prints its report, or with --json one line of JSON (the dict
its bench_* function returns, which scripts parse). The benchmarks are imported only when one runs, so
that building the command line's parser costs nothing.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

HELP = "speed measurements"

# what each benchmark measures: the help of the positional `what`, in the order of its choices
WHAT = {
    "pretrain": "training tokens/s and model-FLOPs utilisation",
    "moe": "MoE-LoRA vs LoRA vs the released code's dense form",
    "nf4": "4-bit vs fp32 base",
    "nullspace": "the projection's step-time overhead and randomized vs full SVD",
    "route": "base vs ungated (fused and stack by stack) vs routed inference",
    "scale": "a training step of our MoE-LoRA and LoRA vs peft's LoRA on NF4 SmolLM2",
    "engine": "the disk-offloaded engine over a stream of prompts: loads, hit rate, router, tokens/s",
}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=list(WHAT), help="; ".join(f"{k}: {v}" for k, v in WHAT.items()))
    parser.add_argument("--json", action="store_true", help="one machine-readable JSON line")
    parser.add_argument("--run", default=None, help="engine only: a trained run to stream its test prompts through "
                                                    "(default: a synthetic run built for the benchmark)")


def run(what: str, trained_run: str | None = None) -> tuple[dict, Callable[[dict], str]]:
    """(the benchmark's result, the function that formats it as text)."""
    if what == "pretrain":
        from .pretrain import bench_pretrain, format_bench_pretrain

        return bench_pretrain(), format_bench_pretrain
    if what == "moe":
        from .moe import bench_moe, format_bench_moe

        return bench_moe(), format_bench_moe
    if what == "nf4":
        from .nf4 import bench_nf4, format_bench_nf4

        return bench_nf4(), format_bench_nf4
    if what == "nullspace":
        from .nullspace import bench_nullspace, format_bench_nullspace

        return bench_nullspace(), format_bench_nullspace
    if what == "route":
        from .route import bench_route, format_bench_route

        return bench_route(), format_bench_route
    if what == "scale":
        from .scale import bench_scale, format_bench_scale

        return bench_scale(), format_bench_scale
    if what == "engine":
        from .engine import bench_engine, format_bench_engine

        return bench_engine(trained_run), format_bench_engine
    raise ValueError(f"unknown benchmark {what!r}: choose one of {', '.join(WHAT)}")


def main(args: argparse.Namespace) -> int:
    if args.run is not None and args.what != "engine":
        raise ValueError(f"--run is for `bench engine`; `bench {args.what}` builds its own models")
    result, text = run(args.what, args.run)
    print(json.dumps(result) if args.json else text(result))
    return 0
