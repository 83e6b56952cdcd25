"""Small, boring helpers for files and randomness that every stage shares.

- `atomic_write_*`: write to a temporary file in the same folder, fsync, then `os.replace`, so a run
  killed mid-write never leaves a half-written file where a good one used to be.
- `seed_everything`: one call seeds Python, NumPy and torch; CPU runs are then deterministic.
- `cache_dir`: where built corpora and tokenizers live (`$MINISTACKS_CACHE`, else ~/.cache/ministacks).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
