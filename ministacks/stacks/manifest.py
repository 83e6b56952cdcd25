"""RUN/manifest.json — what a continual run has done so far — and the cache keys computed from it.

The manifest lists, in training order, every stack the run holds (each entry is the stack's record:
domain, round, losses, seed, ...), the domains finished, the forgetting matrix as it fills in, the
time per domain, and under "config" the whole Preset the run was trained with (presets.preset_record),
which run.py reads back. It is the run's one source of truth: a stack counts as trained only once
the manifest names it (store.py says why that order survives a kill).

`content_key` is the one cache key: results cached beside a run (the oracle's targets, eval.json) are
keyed by the stacks' checksums, never by their names.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..io import atomic_write_json, read_json
from .fingerprint import base_fingerprint
from .store import stack_name, stack_paths

MANIFEST_VERSION = 1
MANIFEST = "manifest.json"


def new_manifest(model: nn.Module, tokenizer, domains: list[str], config: dict[str, Any]) -> dict[str, Any]:
    """A fresh manifest for a run over `domains` (curriculum order). `stacks` gets one entry per
    saved stack, {"domain", "round", ...}, appended after `save_stack` returns; `forgetting.matrix[i][j]`
    is the val loss of domain j after training domain i (None until measured)."""
    for d in domains:
        stack_name(d, 0)  # the same rule as for file names, checked now rather than at the first save
    try:
        json.dumps(config)
    except TypeError as e:
        raise ValueError(f"the run config is not JSON-serialisable: {e}") from None
    n = len(domains)
    return {
        "version": MANIFEST_VERSION,
        "base_fingerprint": base_fingerprint(model),
        "tokenizer": tokenizer.fingerprint(),
        "domains": list(domains),
        "stacks": [],
        "forgetting": {"domains": list(domains), "matrix": [[None] * n for _ in range(n)]},
        "timings": {},
        "config": config,
    }


def read_manifest(run: str | Path) -> dict[str, Any] | None:
    """RUN/manifest.json, or None when the run has none yet."""
    path = Path(run) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); it is written atomically, so it was edited or "
                         "damaged outside ministacks: restore it, or delete it to start the run afresh") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: not a version-{MANIFEST_VERSION} ministacks manifest")
    return manifest


def write_manifest(run: str | Path, manifest: dict[str, Any]) -> None:
    """Atomically replace RUN/manifest.json: a kill leaves the old manifest or the new one, never half."""
    atomic_write_json(Path(run) / MANIFEST, manifest)


# -- cache keys ------------------------------------------------------------------------------------


def content_key(run: str | Path, manifest: dict[str, Any], *settings: Any) -> str:
    """sha256 (hex) over what a cached result was computed from: the base fingerprint, the checksums of
    every stack in `manifest` (its tensor file's sha256 and its record's, read from RUN/stacks/*.json;
    loading verifies both against the files) and `settings` (anything JSON-serialisable: prompts,
    search settings, a router's checksum, ...).

    Keyed by content, not by names: retraining `code_r01` into the same folder writes new tensors under
    the same name, and a key built from (domain, round) would hand back the old stack's numbers."""
    stacks = []
    for entry in manifest.get("stacks", []):
        json_path = stack_paths(run, entry["domain"], entry["round"])[1]
        record = read_json(json_path) if json_path.is_file() else {}
        stacks.append([stack_name(entry["domain"], entry["round"]), record.get("sha256"), record.get("record_sha256")])
    blob = json.dumps([manifest.get("base_fingerprint"), stacks, list(settings)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
