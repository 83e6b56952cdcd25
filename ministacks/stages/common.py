"""What every stage shares: the command-line arguments they have in common, the checks on a folder
before any work starts, and a preset's training data for one domain.

A stage module offers `add_args(parser)` and `main(args) -> exit code` for its command (the table in
__main__.py), and a function `(Preset, run folder) -> JSON summary` that does the work, resumably.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from ..data import load_split
from ..inference.offload import MB
from ..io import read_json
from ..presets import PRESETS, EvalConfig, HarnessConfig, Preset, get_preset
from ..routing.router import ROUTER_DIR
from ..run import load_run
from ..stacks.manifest import content_key, file_sha256
from ..training.sft import StackTrainConfig
from ..training.examples import ExampleSet, PackedExamples


# -- arguments ---------------------------------------------------------------------------------------

def add_preset_args(p: argparse.ArgumentParser, default_out: str | None) -> None:
    """--preset, --out (when the command writes a run folder) and --no-progress."""
    p.add_argument("--preset", default="quick", choices=list(PRESETS), help="size of the run (default: quick)")
    if default_out is not None:
        p.add_argument("--out", default=default_out, help=f"run folder (default: {default_out}); resumes if it holds a run")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_run_args(p: argparse.ArgumentParser) -> None:
    """--run and --preset for the commands that work on a trained run."""
    p.add_argument("--run", default="runs/demo",
                   help="a trained run: the folder `train --out` or `demo --out` wrote (default: runs/demo)")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="the preset the run was trained with (default: recognised from the run)")


def add_quant_arg(p: argparse.ArgumentParser, default: str | None, help: str) -> None:
    p.add_argument("--quant", choices=["none", "nf4"], default=default, help=help)


def preset_of(args) -> Preset:
    """The named preset, with --quant applied where the command has it."""
    preset = get_preset(args.preset)
    quant = getattr(args, "quant", None)
    return replace(preset, quant=quant) if quant else preset


def positive_int(text: str) -> int:
    """argparse type for a count that must be at least 1 (--max-new-tokens)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return n


def positive_mb(text: str) -> float:
    """argparse type for a memory budget in MB: a finite number above 0 (--stack-budget-mb)."""
    try:
        mb = float(text)
    except ValueError:
        mb = 0.0
    if not (0 < mb < float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of MB above 0")
    return mb


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """How `generate` and `chat` hold the stacks (inference/offload.py, the disk-offloaded engine)."""
    p.add_argument("--stack-budget-mb", type=positive_mb, default=None,
                   help="memory for the stacks: each answer's domains are loaded from disk, and past this budget "
                        "the least recently used domain is dropped (default: no limit, a domain stays once loaded)")
    p.add_argument("--all-stacks", action="store_true",
                   help="load every stack before the first answer instead of as answers need them")


def load_for_answers(args, router: bool = True):
    """The run of `generate` / `chat`: stacks from disk on demand (the engine) unless --all-stacks."""
    budget = None if args.stack_budget_mb is None else int(args.stack_budget_mb * MB)
    if args.all_stacks and budget is not None:
        raise ValueError("--all-stacks loads every stack, so --stack-budget-mb has nothing to limit: give one of the two")
    return load_run(args.run, args.preset, router=router, offload=not args.all_stacks, budget_bytes=budget)


def writable_folder(path: str | Path, flag: str = "--out") -> Path:
    """`path` as a folder this process can write (created if missing), checked before any work, so a bad
    --out is one message naming it, not an OSError an hour later about a hidden temporary file."""
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        where = "is a file" if blocker == path else f"is inside {blocker}, which is a file"
        raise ValueError(f"{flag} {path} {where}, not a folder: pass a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()  # a real write: permissions alone miss read-only mounts
    except OSError as e:
        raise ValueError(f"{flag} {path} cannot be written ({e.strerror}): pass a folder you can write to") from None
    return path


# -- a domain's data, as stack training reads it -----------------------------------------------------

def domain_val(preset: Preset, tok, domain: str, cfg: StackTrainConfig) -> ExampleSet:
    """The domain's first `cfg.max_val_examples` validation examples, tokenised for `example_loss`."""
    return ExampleSet(tok, load_split(domain, "val", preset.data)[: cfg.max_val_examples], cfg.completion_only,
                      max_len=cfg.seq_len, batch_size=cfg.eval_batch_size)


def domain_data(preset: Preset, tok, domain: str, cfg: StackTrainConfig) -> tuple[PackedExamples, ExampleSet]:
    """(training windows, validation set) of one domain: what one round of stack training reads."""
    train = PackedExamples(tok, load_split(domain, "train", preset.data), cfg.completion_only, cfg.seq_len)
    return train, domain_val(preset, tok, domain, cfg)


def eval_key(sr, cfg: EvalConfig) -> str:
    """eval.json's cache key: the base and stacks' content, the router's weights and settings, the EvalConfig.

    The router's checksum (its tensor file's sha256) is in it because `route`, run again, writes a new
    router under the same names: without it, blocks measured with the old router would be reused as the
    new one's. Any change discards the whole file, base and ungated blocks too (one key, rather than
    one per block keyed by what that block depends on). The harness's settings (cfg.harness) are left out:
    eval measures nothing with them, and the harness stage keys its own file by them."""
    router = sr.paths.run / ROUTER_DIR
    settings = asdict(replace(cfg, harness=HarnessConfig()))
    return content_key(sr.paths.run, sr.manifest, file_sha256(router / "model.safetensors"),
                       read_json(router / "config.json"), settings)
