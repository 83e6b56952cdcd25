"""The base fingerprint: which base a stack or a run belongs to (docs/brainstacks.md §7).

This file implements
  - `base_fingerprint` : a sha256 over the base model's own tensors (never the stacks)

Why the base fingerprint: a stack is a correction *to one particular base*. On any other base (other
seed, other pretraining run, 4-bit instead of fp32) its deltas are meaningless, so loading is refused
with both fingerprints in the message. The fingerprint hashes name, dtype, shape and bytes of every
base parameter and persistent buffer, so it is exact; the stacks are left out, and so is the
`.base_layer` that `inject_stacks` inserts into names, so a model has the same fingerprint before
and after injection and whatever stacks it holds.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

from .layer import StackedLinear


def base_fingerprint(model: nn.Module) -> str:
    """sha256 (hex) over name, dtype, shape and raw bytes of each base parameter and persistent buffer.

    Sorted by name, so it does not depend on module order. Inside a StackedLinear only its
    `base_layer` counts: its `.stacks`, `.active` and anything else attached to it (a null-space basis,
    say) are not the base. Left out as well: non-persistent buffers (derived from the config: RoPE
    tables, the 4-bit layer's dequantization cache). `.base_layer` is dropped from names, so wrapping a
    model with `inject_stacks` does not change its fingerprint. A tied matrix (one tensor under two
    names) is hashed once, under the first of its names."""
    stacked = [name for name, m in model.named_modules() if isinstance(m, StackedLinear)]
    rename = {f"{p}.base_layer." if p else "base_layer.": f"{p}." if p else "" for p in stacked}
    skip = tuple(f"{p}." if p else "" for p in stacked)  # after the renames: the rest of each stacked layer
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, t in sorted(_base_tensors(model, skip, rename)):
        if id(t) in seen:
            continue
        seen.add(id(t))
        data = t.detach().cpu().contiguous()
        h.update(f"{name}|{data.dtype}|{tuple(data.shape)}\n".encode())
        # raw bytes through a uint8 view: works for every dtype, bfloat16 and the 4-bit codes included
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _module_tensors(model: nn.Module):
    """(name, tensor) of every parameter and persistent buffer, as state_dict names them, read from the
    modules themselves. Not through state_dict(): a bitsandbytes 4-bit layer converts its weight's layout to
    save it (bitsandbytes 0.50 on the CPU: scale/bases.py's keep_differentiable), so asking for a fingerprint
    would change what it fingerprints. A 4-bit weight counts by its packed codes, with its quantization's
    kind, block size and shape in its name line."""
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, p in module._parameters.items():
            if p is not None:
                state = getattr(p, "quant_state", None)
                tag = f"[{state.quant_type},{state.blocksize},{tuple(state.shape)}]" if state is not None else ""
                yield dot + name + tag, p
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                yield dot + name, b


def _base_tensors(model, skip, rename):
    for name, t in _module_tensors(model):
        base = next((old for old in rename if name.startswith(old)), None)
        if base is not None:
            yield rename[base] + name[len(base):], t
        elif not name.startswith(skip):
            yield name, t
