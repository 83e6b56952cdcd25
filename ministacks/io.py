"""Small, boring helpers for files and randomness that every stage shares.

- `atomic_write_*`: write to a temporary file in the same folder, fsync, then `os.replace`, so a run
  killed mid-write never leaves a half-written file where a good one used to be (nor, Ctrl-C included,
  a stray temporary file); a failed write's OSError names the file asked for, not the temporary one.
- `seed_everything`: one call seeds Python, NumPy and torch; CPU runs are then deterministic.
- `cache_dir`: where built corpora and tokenizers live (`$MINISTACKS_CACHE`, else ~/.cache/ministacks).
- `record_checksum`, `RunFileError`, `read_json_file`, `read_checked_tensors`: the checks every file of a
  run gets (a JSON record's own sha256, a tensor file against the sha256 and size its record holds),
  with a damaged file reported by name and with the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as safetensors_from_bytes
from safetensors.torch import load_file, save_file


def cache_dir() -> Path:
    """Root folder for cached corpora and tokenizers; override with $MINISTACKS_CACHE."""
    root = os.environ.get("MINISTACKS_CACHE") or Path.home() / ".cache" / "ministacks"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _atomic_replace(path: Path, write) -> None:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        # name the file the caller asked for, not the hidden temporary one the error is about
        if e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e  # errno picks the subclass (NotADirectoryError, ...)
    finally:
        # any exit but success, Ctrl-C (KeyboardInterrupt) included, leaves no temporary file behind
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic_replace(Path(path), write)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors, never pickle. Tensors are made contiguous (safetensors requires it)."""
    flat = {k: v.detach().contiguous() for k, v in tensors.items()}
    _atomic_replace(Path(path), lambda tmp: save_file(flat, tmp, metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# -- checked files: a record's own checksum, a tensor file against its record ------------------------


def record_checksum(record: dict[str, Any]) -> str:
    """sha256 (hex) of the record without its "record_sha256": its canonical JSON (sorted keys, no spaces),
    taken as it reads back from disk, so that the same record always gives the same checksum."""
    body = json.loads(json.dumps({k: v for k, v in record.items() if k != "record_sha256"}))
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class RunFileError(ValueError):
    """A file of a run other than a stack (the base, its config, the tokenizer, the router) that is
    missing a part, damaged, or belongs to another run. A ValueError, so the CLI prints it in one line;
    the message names the file, what is wrong and what to do. `.path` is the file."""

    def __init__(self, path: Path, problem: str):
        self.path = Path(path)
        super().__init__(f"{self.path}: {problem}")


def read_json_file(path: str | Path, fix: str) -> Any:
    """`read_json`, with a missing or unparsable file reported as a RunFileError naming it; `fix` says what to do."""
    path = Path(path)
    if not path.is_file():
        raise RunFileError(path, f"missing; {fix}")
    try:
        return read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFileError(path, f"damaged: not valid JSON ({e}); {fix}") from None


def size_problem(n_bytes: int, record: dict[str, Any], damaged: str = "damaged") -> str | None:
    """What is wrong with a file of `n_bytes` whose JSON record says how many were written ("n_bytes"),
    in words; None when the sizes agree or the record does not say."""
    if "n_bytes" not in record or n_bytes == record["n_bytes"]:
        return None
    what = "truncated" if n_bytes < record["n_bytes"] else f"{damaged} (longer than written)"
    return f"{what}: {n_bytes} bytes, {record['n_bytes']} were written"


def read_checked_tensors(path: str | Path, record: dict[str, Any], fix: str, error: type = RunFileError,
                         damaged: str = "damaged") -> dict[str, torch.Tensor]:
    """A safetensors file checked against the "sha256" / "n_bytes" its JSON record holds (when it holds
    them: files written before they were recorded load unchecked), then parsed; any fault is an `error`
    (RunFileError; store.StackFileError for a stack) naming the file, `damaged` the word for a bad byte."""
    path = Path(path)
    if not path.is_file():
        raise error(path, f"missing; {fix}")
    data = path.read_bytes()
    problem = size_problem(len(data), record, damaged)
    if problem is not None:
        raise error(path, f"{problem}; {fix}")
    if "sha256" in record and hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise error(path, f"{damaged}: its sha256 does not match the one recorded when it was written; {fix}")
    try:
        return safetensors_from_bytes(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types; say it in words
        raise error(path, f"{damaged}: not a readable safetensors file ({e}); {fix}") from None
