"""Checkpoints that survive a kill at any moment, in one format shared by every training loop.

Layout of a run folder's checkpoints:

    DIR/checkpoints/
        latest.json                   {"name": "step_00000120"}   <- written last, atomically
        step_00000120/
            model.safetensors         trainable tensors (weights, never pickle)
            optimizer.safetensors     AdamW moments, one tensor per (parameter, key)
            optimizer.json            param_groups (lr, betas, ...) and non-tensor state
            state.json                the loop's own state: step, curves, timings, config

Why a folder per checkpoint plus a pointer: a checkpoint is several files, and a kill can land
between two of them. Each folder is written under a temporary name and renamed into place when
complete; only then does `latest.json` move to it (an atomic `os.replace`). Whatever moment the
process dies, `latest.json` names a complete checkpoint. Older folders are removed afterwards.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .io import RunFileError, atomic_save_tensors, atomic_write_json, load_tensors, read_json

LATEST = "latest.json"


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state_dict into tensors (for safetensors) and JSON metadata."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, pstate in sd["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of `optimizer_to_tensors`: load the state back into an optimizer over the same parameters."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


@dataclass
class Checkpoint:
    path: Path
    model: dict[str, torch.Tensor]
    optimizer: tuple[dict[str, torch.Tensor], dict[str, Any]] | None
    state: dict[str, Any]


def save_checkpoint(
    root: str | Path,
    step: int,
    model_tensors: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    keep: int = 1,
) -> Path:
    """Write checkpoint `step` under `root` and point `latest.json` at it; keep the newest `keep` folders."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    atomic_save_tensors(tmp / "model.safetensors", model_tensors)
    if optimizer is not None:
        tensors, meta = optimizer_to_tensors(optimizer)
        atomic_save_tensors(tmp / "optimizer.safetensors", tensors)
        atomic_write_json(tmp / "optimizer.json", meta)
    atomic_write_json(tmp / "state.json", {"step": step, **state})
    shutil.rmtree(final, ignore_errors=True)  # a leftover from a run killed right after this rename
    os.rename(tmp, final)
    atomic_write_json(root / LATEST, {"name": name})
    # only now is the new checkpoint the one a resume reads: older ones can go
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in folders[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(root: str | Path) -> Checkpoint | None:
    """The newest complete checkpoint under `root`, or None when there is none yet."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root
    try:
        path = root / read_json(pointer)["name"]
        model = load_tensors(path / "model.safetensors")
        opt = None
        if (path / "optimizer.safetensors").is_file():
            opt = (load_tensors(path / "optimizer.safetensors"), read_json(path / "optimizer.json"))
        state = read_json(path / "state.json")
    except Exception as e:  # noqa: BLE001 - re-raised with the path a user can act on
        # a ValueError: the command line prints it as one line naming the folder to delete
        raise RunFileError(path, f"checkpoint unreadable ({type(e).__name__}: {e}); delete {root} to start "
                                 "that training over") from None
    return Checkpoint(path=path, model=model, optimizer=opt, state=state)
