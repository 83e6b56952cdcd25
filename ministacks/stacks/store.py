"""Stacks on disk and the run manifest: a frozen stack is written once and reloaded exactly (docs/brainstacks.md §4, §7).

This file implements
  - `save_stack` / `load_stack`  : one frozen stack <-> one safetensors file plus one JSON record
  - `load_all_stacks`            : every stack a manifest lists, in its order; a bad file is reported
                                   by name and skipped, the others stay usable
  - `read_stack` / `install_stack` : the two halves of a load: read and check the files (no model
                                   touched), then freeze the stack into the model
  - `StackFileError`, `ForeignBaseError` : what can be wrong with a stack file, said in words

Layout of a run folder (the base and tokenizer come from `pretrain`, see `lm.base.load_base`):

    RUN/
        base/model.safetensors, base/config.json      the frozen base
        tokenizer.json
        manifest.json                  domains, stacks in training order, forgetting matrix, timings
                                       (stacks/manifest.py)
        stacks/
            chat_r01.safetensors       one tensor per (wrapped projection, adapter parameter):
                                         "layers.0.self_attn.q_proj.lora_A", "...q_proj.router.weight", ...
            chat_r01.json              domain, round, adapter kind + AdapterConfig (to rebuild it without
                                       guessing), base fingerprint, sha256 and size of the tensor file,
                                       the caller's `meta` (val losses, steps, seed, ...), and
                                       `record_sha256`, a checksum over all of the above
            chat_r02.safetensors, chat_r02.json, code_r01.safetensors, ...

Why a stack survives a kill at any moment. Every file is written atomically (temporary file, fsync,
rename: `ministacks.io`), and in this order:

    1. stacks/X.safetensors     a kill here leaves, at worst, a tensor file with no JSON: an orphan
    2. stacks/X.json            a kill here leaves a complete stack the manifest does not list yet
    3. manifest.json entry      (the caller's step) only now does the run count the stack as done

So the manifest only ever lists complete stacks, and a resumed run retrains an unlisted round, whose
files then simply replace the leftovers. (Re-saving a stack the manifest *already* lists is the one
way to break this: a kill between steps 1 and 2 would leave the new tensors beside the old JSON. The
sha256 check reports that as a corrupted file instead of loading a mismatched stack.)

Why a sha256 on top of safetensors' own checks: safetensors notices a file cut short in its header or
its tensor table, but a flipped byte inside the tensor data parses as a valid (wrong) number, and a
stack that silently adds noise to every projection is worse than one that refuses to load.

Why a second sha256, over the JSON record: the record is half of the stack. Its AdapterConfig sets the
scale s = α/√r, the routing (top-k, top-p, dense), the rank; its kind, domain and round say what the
tensors are. An edited lora_alpha loads tensors that fit perfectly and computes a different delta. So
`record_sha256` covers the whole record (tensor checksum and `meta` included), and any edit is a load
error naming the JSON file. Records written before it existed (stack format version 1) still load,
with a warning that their settings are unchecked; retrain (or re-save) the stack to get a checked one.

Loaded stacks are rebuilt with `make_adapter(kind, cfg)` and frozen by `stacks.freeze_active`, the
same call that freezes a stack in memory: requires_grad False, eval mode, same order. A model rebuilt
from disk gives bitwise the logits of the model that trained the stacks (tests/test_store.py).
No pickle anywhere: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from safetensors.torch import save as safetensors_to_bytes
import torch
import torch.nn as nn

from ..io import (atomic_write_bytes, atomic_write_json, read_checked_tensors, read_json, record_checksum,
                  size_problem)
from .fingerprint import base_fingerprint
from .layer import AdapterConfig, StackedLinear, freeze_active, make_adapter

STACK_FORMAT = "ministacks-stack"  # written into every stack JSON and safetensors header
STACK_VERSION = 2  # 2: the record carries record_sha256 (1: without it; still read, with a warning)
READABLE_VERSIONS = (1, 2)
STACKS_DIR = "stacks"
_DOMAIN_RE = re.compile(r"^[A-Za-z0-9_-]+$")  # a file name and a ModuleDict key ("." is not allowed there)


class StackFileError(RuntimeError):
    """A stack file that cannot be used: missing, truncated, corrupted, or made for another model.
    The message names the file and what is wrong; `.path` is the file."""

    def __init__(self, path: Path, problem: str):
        self.path = Path(path)
        super().__init__(f"{self.path}: {problem}")


class ForeignBaseError(StackFileError):
    """The stack was trained on another base model: its deltas would be meaningless here."""


# -- names and paths -------------------------------------------------------------------------------


def stack_name(domain: str, round: int) -> str:
    """"chat", 1 -> "chat_r01": the file stem of a stack, and its name in reports."""
    if not isinstance(domain, str) or not _DOMAIN_RE.match(domain):
        raise ValueError(f"domain {domain!r} must be letters, digits, '_' or '-' (it becomes a file name)")
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ValueError(f"round must be a non-negative int, got {round!r}")
    return f"{domain}_r{round:02d}"


def stack_paths(run: str | Path, domain: str, round: int) -> tuple[Path, Path]:
    """(RUN/stacks/X.safetensors, RUN/stacks/X.json) for X = stack_name(domain, round)."""
    stem = Path(run) / STACKS_DIR / stack_name(domain, round)
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def named_stacked_layers(model: nn.Module) -> list[tuple[str, StackedLinear]]:
    """(module path, layer) of every StackedLinear, in module order (the order of the tensor keys)."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, StackedLinear)]
    if not layers:
        raise ValueError("the model has no stacked layers: call stacks.layer.inject_stacks(model) first")
    return layers


# -- one stack -------------------------------------------------------------------------------------


def reference_adapters(model, kind: str, cfg: AdapterConfig) -> list[tuple[str, StackedLinear, nn.Module]]:
    """What `make_adapter(kind, cfg)` builds for each layer, on the meta device: shapes and settings,
    no memory and no initialisation cost. Used to check a stack against its JSON description."""
    factory = make_adapter(kind, cfg)
    with torch.device("meta"):
        return [(path, layer, factory(layer.in_features, layer.out_features)) for path, layer in named_stacked_layers(model)]


def save_stack(run: str | Path, model: nn.Module, domain: str, round: int, kind: str,
               adapter_cfg: AdapterConfig, meta: dict[str, Any] | None = None, index: int = -1) -> Path:
    """Write frozen stack `index` of `domain` (default -1: the most recently frozen) as stack
    `{domain}_r{round:02d}`; return the path of its .safetensors file (the JSON is beside it).

    `kind` and `adapter_cfg` are the ones the stack was made with (`add_stack(model, make_adapter(kind,
    adapter_cfg))`); they are checked against the adapters in memory, so the JSON cannot describe a
    stack other than the one saved. `meta` is any JSON-serialisable dict (val losses, steps, ...),
    stored under the record's "meta" key. Order: tensor file first, then JSON (see the module docstring);
    the caller adds the manifest entry last."""
    name = stack_name(domain, round)
    tensor_path, json_path = stack_paths(run, domain, round)
    try:
        json.dumps(meta)  # fail before writing anything, not between the two files
    except TypeError as e:
        raise ValueError(f"meta for stack {name} is not JSON-serialisable: {e}") from None

    tensors: dict[str, torch.Tensor] = {}
    adapters = []
    keep_train = set()
    for path, layer, ref in reference_adapters(model, kind, adapter_cfg):
        if domain not in layer.stacks:
            raise ValueError(f"layer {path} has no frozen stack of domain {domain!r}: "
                             f"freeze one with stacks.layer.freeze_active(model, {domain!r}) before saving")
        stack = layer.stacks[domain]
        if not -len(stack) <= index < len(stack):
            raise ValueError(f"layer {path} has {len(stack)} frozen stack(s) of {domain!r}, no index {index}")
        adapter = stack[index]
        if type(adapter) is not type(ref) or adapter.extra_repr() != ref.extra_repr():
            raise ValueError(f"stack {name} at {path} is {type(adapter).__name__}({adapter.extra_repr()}), "
                             f"but kind={kind!r} with {adapter_cfg} makes {type(ref).__name__}({ref.extra_repr()}): "
                             "pass the kind and AdapterConfig the stack was trained with")
        for key, value in adapter.state_dict().items():
            tensors[f"{path}.{key}"] = value.detach().cpu().contiguous()
        adapters.append(adapter)
        keep_train.add(bool(getattr(adapter, "_keep_train_mode", False)))

    fingerprint = base_fingerprint(model)
    header = {"format": STACK_FORMAT, "name": name, "base_fingerprint": fingerprint}  # the file names itself
    data = safetensors_to_bytes(tensors, metadata=header)
    atomic_write_bytes(tensor_path, data)  # 1. the tensors

    record: dict[str, Any] = {
        "format": STACK_FORMAT,
        "version": STACK_VERSION,
        "name": name,
        "domain": domain,
        "round": round,
        "kind": kind,
        "adapter_config": dataclasses.asdict(adapter_cfg),
        # frozen with keep_train_mode=True (the released code's noisy frozen stacks): reload it that way
        "keep_train_mode": any(keep_train),
        "base_fingerprint": fingerprint,
        "tensor_file": tensor_path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "n_bytes": len(data),
        "n_tensors": len(tensors),
        "n_params": sum(t.numel() for t in tensors.values()),
        "meta": meta if meta is not None else {},
    }
    record["record_sha256"] = record_checksum(record)
    atomic_write_json(json_path, record)  # 2. the record; 3. the manifest entry is the caller's
    for adapter in adapters:
        adapter.stack_id = name  # so that loading the same stack into this model again is refused
    return tensor_path


def _read_record(json_path: Path, domain: str, round: int) -> dict[str, Any]:
    if not json_path.is_file():
        raise StackFileError(json_path, "missing: no such stack record (was the stack saved? "
                                        "a kill before its JSON was written leaves only the .safetensors)")
    try:
        record = read_json(json_path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StackFileError(json_path, f"corrupted: not valid JSON ({e})") from None
    need = ("format", "version", "domain", "round", "kind", "adapter_config", "base_fingerprint", "sha256", "n_bytes")
    lacking = [k for k in need if k not in record] if isinstance(record, dict) else list(need)
    if lacking:
        raise StackFileError(json_path, f"not a ministacks stack record: lacks {lacking}")
    if record["format"] != STACK_FORMAT or record["version"] not in READABLE_VERSIONS:
        raise StackFileError(json_path, f"format {record['format']!r} version {record['version']!r}; "
                                        f"this ministacks reads {STACK_FORMAT!r} versions {READABLE_VERSIONS}")
    if record["version"] == 1:
        warnings.warn(f"{json_path}: a stack record of format version 1, without a checksum over its settings: "
                      "loaded, but an edit to its adapter_config would go unnoticed. Retrain the stack (or "
                      "re-save it with store.save_stack) to get a checked record", stacklevel=3)
    elif record.get("record_sha256") != record_checksum(record):
        raise StackFileError(json_path, "edited: the record does not match its record_sha256. Its settings "
                                        "(adapter_config, kind, domain, round, base) are part of the stack — "
                                        "changed, the same tensors compute another delta. Restore the file "
                                        "from a backup, or retrain this stack")
    if (record["domain"], record["round"]) != (domain, round):
        raise StackFileError(json_path, f"describes stack {record['domain']!r} round {record['round']}, "
                                        f"not {domain!r} round {round}: was it renamed by hand?")
    return record


def read_record(run: str | Path, domain: str, round: int) -> dict[str, Any]:
    """The checked JSON record of stack `{domain}_r{round:02d}` (no tensor is read): StackFileError if it
    is missing, damaged, edited or describes another stack."""
    return _read_record(stack_paths(run, domain, round)[1], domain, round)


_FIX = "retrain this stack or restore the file from a backup"


def _require_tensor_file(tensor_path: Path) -> None:
    if not tensor_path.is_file():
        raise StackFileError(tensor_path, "missing: the stack record exists but its tensor file does not")


def _read_tensors(tensor_path: Path, record: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The file's bytes, checked against the size and sha256 in the JSON, then parsed."""
    _require_tensor_file(tensor_path)
    return read_checked_tensors(tensor_path, record, _FIX, error=StackFileError, damaged="corrupted")


def load_stack(run: str | Path, model: nn.Module, domain: str, round: int) -> dict[str, Any]:
    """Rebuild stack `{domain}_r{round:02d}` from RUN/stacks, freeze it into every layer's
    `stacks[domain]` (appended, after what the model already holds), and return its JSON record
    (the caller's `meta` is under "meta"). Raises StackFileError (or ForeignBaseError) before
    touching the model when anything is wrong."""
    return _load_stack(Path(run), model, domain, round, base_fingerprint(model))


class StackFile(NamedTuple):
    """One stack as read from disk, checked, and not yet in any model (`read_stack`)."""

    run: Path
    domain: str
    round: int
    record: dict[str, Any]  # its JSON record, checked against its record_sha256
    tensors: dict[str, torch.Tensor]  # its tensors, checked against the record's sha256 and size


def read_stack(run: str | Path, domain: str, round: int, model_fp: str) -> StackFile:
    """Read stack `{domain}_r{round:02d}` from RUN/stacks and check it: its record, its tensor file's size
    and sha256, and that it was trained on the base whose fingerprint is `model_fp`. Touches no model, so
    it may run on another thread while the model answers (inference/offload.py's prefetch); `install_stack`
    then puts it into the model. Raises StackFileError (or ForeignBaseError)."""
    run = Path(run)
    name = stack_name(domain, round)
    tensor_path, json_path = stack_paths(run, domain, round)
    record = _read_record(json_path, domain, round)
    tensors = _read_tensors(tensor_path, record)
    if record["base_fingerprint"] != model_fp:
        raise ForeignBaseError(tensor_path, f"stack {name} was trained on base {record['base_fingerprint']}, "
                                            f"this model's base is {model_fp}; stacks only work on the base they "
                                            "were trained on: load the run's own base (lm.base.load_base)")
    return StackFile(run, domain, round, record, tensors)


def _load_stack(run: Path, model: nn.Module, domain: str, round: int, model_fp: str) -> dict[str, Any]:
    return install_stack(model, read_stack(run, domain, round, model_fp))


def install_stack(model: nn.Module, stack: StackFile) -> dict[str, Any]:
    """Freeze a stack `read_stack` read into every layer's `stacks[domain]` (appended) and return its
    record; StackFileError, before the model is touched, if it does not fit this model."""
    run, domain, round, record, tensors = stack
    name = stack_name(domain, round)
    tensor_path, json_path = stack_paths(run, domain, round)
    try:
        cfg = AdapterConfig(**record["adapter_config"])
        refs = reference_adapters(model, record["kind"], cfg)
    except (TypeError, ValueError) as e:
        raise StackFileError(json_path, f"cannot rebuild the adapters it describes: {e}") from None

    # Check every key and shape against this model before building anything: a half-loaded stack is
    # worse than none, so the model is only changed once the whole stack is known to fit.
    expected = {f"{path}.{k}": tuple(v.shape) for path, _, ref in refs for k, v in ref.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise StackFileError(tensor_path, f"does not fit this model: missing {missing[:3]}"
                                          f"{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                                          f"{' ...' if len(unexpected) > 3 else ''} (was it saved from another model?)")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise StackFileError(tensor_path, f"{key} has shape {list(tensors[key].shape)} in the file, this model "
                                              f"with kind={record['kind']!r} and {cfg} expects {list(shape)}")
    for path, layer, _ in refs:
        if domain in layer.stacks and any(getattr(a, "stack_id", None) == name for a in layer.stacks[domain]):
            raise ValueError(f"stack {name} is already in this model (at {path}): loading it twice would add it twice")

    factory = make_adapter(record["kind"], cfg)
    built = []
    for path, layer, _ in refs:
        adapter = factory(layer.in_features, layer.out_features)
        prefix = f"{path}."
        adapter.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
        adapter.stack_id = name
        built.append(adapter.to(_device_of(layer)))

    # Freeze through the same call as in memory (requires_grad False, eval mode, appended in order):
    # the active slot lends itself for a moment and gets back whatever it held.
    held = [layer.active for _, layer, _ in refs]
    try:
        for (_, layer, _), adapter in zip(refs, built):
            layer.active = adapter
        freeze_active(model, domain, keep_train_mode=bool(record.get("keep_train_mode", False)))
    finally:
        for (_, layer, _), active in zip(refs, held):
            layer.active = active
    return record


def _device_of(layer: StackedLinear) -> torch.device:
    """Where the base projection lives (a parameter, or a buffer for the 4-bit layer)."""
    ref = next(layer.base_layer.parameters(), None)
    ref = ref if ref is not None else next(layer.base_layer.buffers(), None)
    return ref.device if ref is not None else torch.device("cpu")


class DamagedStacksError(ValueError):
    """Some stack files of a run cannot be loaded. The run is refused as a whole: every stack is a
    correction on top of the stacks trained before it, so a stack trained after a damaged one is not
    sound without it. The message names each damaged file and the command that repairs the run."""


def repair_command(run: str | Path, domain: str, round: int) -> str:
    return f"python -m ministacks repair --run {run} --from {domain}:{round}"


def damaged_stacks(run: Path, problems: list[str], first: tuple[str, int]) -> DamagedStacksError:
    """The one message for a run with damaged stacks: each problem, and the repair from the first."""
    return DamagedStacksError(
        f"{run}: {len(problems)} stack file(s) cannot be loaded, so the run is refused (every later stack was "
        "trained on top of them):\n" + "\n".join(f"  {p}" for p in problems) + "\nRepair: " + repair_command(run, *first)
        + " deletes that stack and every stack trained after it; then run the command that trained the run "
        "again (train or demo, same --out): it retrains from there")


def check_stack_size(run: str | Path, domain: str, round: int) -> dict[str, Any]:
    """The checked record of a stack, and its tensor file there at the size the record says (a missing or
    truncated file): what can be checked without reading the tensors. StackFileError otherwise."""
    record = read_record(run, domain, round)
    tensor_path = stack_paths(run, domain, round)[0]
    _require_tensor_file(tensor_path)
    problem = size_problem(tensor_path.stat().st_size, record, damaged="corrupted")  # as _read_tensors words it
    if problem is not None:
        raise StackFileError(tensor_path, f"{problem}; {_FIX}")
    return record


def load_all_stacks(run: str | Path, model: nn.Module, manifest: dict[str, Any], strict: bool = False) -> list[str]:
    """Load every stack in `manifest["stacks"]` (entries {"domain", "round", ...}) in manifest order.

    A stack that cannot be loaded (missing, truncated, corrupted, or saved from another base) is
    reported with a warning that names the file and what is wrong, and skipped: the others still
    load. Returns the names of the skipped stacks ([] when all loaded). With `strict` (what every
    command uses), any such stack is a DamagedStacksError instead, naming every damaged file and the
    repair: retrain from the first damaged stack (`repair_command`). A manifest written for another
    base is refused outright with ForeignBaseError: then no stack of it would fit."""
    run = Path(run)
    fp = base_fingerprint(model)
    if manifest.get("base_fingerprint") not in (None, fp):
        raise ForeignBaseError(run / "manifest.json", f"this run was trained on base {manifest['base_fingerprint']}, "
                                               f"this model's base is {fp}: "
                                               "load the run's own base (lm.base.load_base)")
    failed, problems, first = [], [], None
    for entry in manifest.get("stacks", []):
        domain, round = entry["domain"], entry["round"]
        try:
            _load_stack(run, model, domain, round, fp)
        except StackFileError as e:
            name = stack_name(domain, round)
            if not strict:
                warnings.warn(f"stack {name} not loaded: {e}", stacklevel=2)
            failed.append(name)
            problems.append(str(e))
            first = first or (domain, round)
    if strict and failed:
        raise damaged_stacks(run, problems, first)
    return failed
