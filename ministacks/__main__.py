"""Command line: `python -m ministacks <command> ...` (also installed as `ministacks`).

    demo       every stage that exists, on the embedded default data, then report.md
    pretrain   pretrain the base model from random initialisation (resumes if DIR has a checkpoint)
    compare    Experiment 1: MoE-LoRA vs the parameter-matched single LoRA on chat
    boost      residual boosting rounds on chat until the stop rule
    data       build the domain corpora (cached) and print their sizes
    train      continual domains in curriculum order, null-space projection, forgetting matrices
    route      train the meta-router of a trained run (outcome-based targets)
    eval       base / ungated / routed: test loss and task accuracy per domain
    generate   answer one prompt with a trained run (routed, or any mode / weights)
    chat       interactive: route, generate, force weights, compare the three modes
    rl         DPO or GRPO on the last stack of a run's last-trained domain
    psn        PSN v1: the continual run on a randomly initialised base, beside the pretrained one
    repair     undo a run back to before a (damaged) stack, so that `train`/`demo` retrains from there
    bench      speed measurements: `bench pretrain`, `bench moe`, `bench nf4`, `bench nullspace`, `bench route`
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Argument parsing only: each command is a module with `HELP`, `add_args(parser)` and `main(args)`.
# command -> the module that implements it, in the order `--help` lists them
COMMANDS = {
    "demo": "ministacks.stages.demo",
    "pretrain": "ministacks.stages.pretrain",
    "compare": "ministacks.stages.compare",
    "boost": "ministacks.stages.boost",
    "train": "ministacks.stages.continual",
    "route": "ministacks.stages.route",
    "eval": "ministacks.stages.evaluate",
    "generate": "ministacks.stages.generate",
    "chat": "ministacks.stages.chat",
    "rl": "ministacks.stages.rl",
    "psn": "ministacks.stages.psn",
    "repair": "ministacks.stages.repair",
    "data": "ministacks.stages.data",
    "bench": "ministacks.bench.command",
}

# what Ctrl-C prints; the other commands resume from their checkpoints and caches
STOPPED = {"chat": "bye", "generate": "stopped", "bench": "stopped"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ministacks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP)
        module.add_args(p)
        p.set_defaults(func=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .runtime import keep_freed_memory

    from .stacks.store import StackFileError

    keep_freed_memory()  # ~5% faster training steps; fine for a command-line process (see its docstring)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; every file is written atomically, so
        # nothing is half-written, and the resumable stages pick up from their last checkpoint
        print(STOPPED.get(args.command, "stopped; run the same command to resume"), file=sys.stderr)
        return 130  # 128 + SIGINT, the shell's convention
    except ValueError as e:  # errors a user can cause: say what and how to fix it
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StackFileError as e:  # a damaged or foreign stack file, named, with what to do
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be read or written (FileNotFoundError included)
        print(f"error: {e}" if e.filename is None else f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
