"""One domain's stacks in and out of a model: what the disk-offloaded engine (inference/offload.py) does per prompt.

This file implements
  - `load_domain` / `unload_domain` : every round of one domain into a model's `stacks[domain]`, or out
                                     of it; keyed by domain, never by position
  - `domain_rounds`, `domain_order` : what a run's manifest says about its domains
  - `stack_bytes`, `resident_bytes` : what a stack costs in memory, before it is read and once loaded

A loaded domain is the same thing `load_all_stacks` (stacks/store.py) leaves: the same adapters, frozen
the same way, in the layers' `stacks` in the run's order. So a model that loads and drops domains as
prompts need them gives bitwise the logits of one that holds every stack (tests/test_engine.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from .layer import AdapterConfig
from .store import (StackFile, StackFileError, install_stack, named_stacked_layers, read_stack, reference_adapters,
                    stack_name)


def domain_rounds(manifest: dict[str, Any], domain: str) -> list[int]:
    """The rounds of `domain`'s stacks, in manifest (training) order."""
    return [entry["round"] for entry in manifest.get("stacks", []) if entry["domain"] == domain]


def domain_order(manifest: dict[str, Any]) -> list[str]:
    """The domains in the order of their first stack in the manifest: the order `load_all_stacks` leaves
    in every layer's `stacks`, and so the order in which a layer sums its domains."""
    return list(dict.fromkeys(entry["domain"] for entry in manifest.get("stacks", [])))


def stack_bytes(model: nn.Module, record: dict[str, Any]) -> int:
    """The bytes the stack a record describes takes in `model` once loaded: every tensor of every adapter,
    as `make_adapter` builds them for this model's layers (on the meta device: nothing is allocated, and
    the tensor file is not read)."""
    try:
        refs = reference_adapters(model, record["kind"], AdapterConfig(**record["adapter_config"]))
    except (TypeError, ValueError) as e:
        raise StackFileError(Path(record.get("name", "?")), f"cannot rebuild the adapters it describes: {e}") from None
    return sum(t.numel() * t.element_size() for _, _, ref in refs for t in ref.state_dict().values())


def resident_bytes(model: nn.Module, domain: str) -> int:
    """The bytes `domain`'s frozen stacks take in `model` now, counted from the tensors themselves."""
    return sum(t.numel() * t.element_size() for _, layer in named_stacked_layers(model) if domain in layer.stacks
               for adapter in layer.stacks[domain] for t in adapter.state_dict().values())


def load_domain(run: str | Path, model: nn.Module, manifest: dict[str, Any], domain: str, model_fp: str,
                read: dict[int, StackFile] | None = None) -> list[dict[str, Any]]:
    """Load every stack of `domain` the manifest lists (all its rounds, in training order) into `model`'s
    `stacks[domain]`; return their records. `model_fp` is the model's `base_fingerprint` (computed once
    by the caller: hashing the base for every load would cost more than the load). `read` hands over
    stacks already read (round -> StackFile from `read_stack`, as a prefetch does); the others are read here.

    All or nothing: every stack is read and checked before the model is touched, and if one does not fit,
    the stacks of the domain installed so far are removed again before the error is raised.

    Keyed by domain, never by position: each stack goes into `stacks[domain]` of the domain its own
    record names (`store.read_stack` refuses a file whose record names another), whatever order domains are
    loaded and dropped in. The released inference engine kept its stacks in a list and assigned the
    router's weights by position, so a run whose domains loaded out of order weighted one domain's
    stacks with another's weight. Afterwards the layers hold their domains in manifest order
    (`domain_order`), as `load_all_stacks` leaves them, so a layer sums its stacks in the same order and
    the logits are bitwise those of a model that loaded every stack (tests/test_engine.py)."""
    rounds = domain_rounds(manifest, domain)
    if not rounds:
        raise ValueError(f"the manifest lists no stack of domain {domain!r}; it has {', '.join(domain_order(manifest))}")
    if any(domain in layer.stacks for _, layer in named_stacked_layers(model)):
        raise ValueError(f"the stacks of {domain!r} are already in this model: unload_domain it first")
    read = read or {}
    stacks = [read[r] if r in read else read_stack(run, domain, r, model_fp) for r in rounds]
    for r, stack in zip(rounds, stacks):
        if (stack.domain, stack.round) != (domain, r):  # a caller's mix-up, never a file's
            raise ValueError(f"stack {stack_name(stack.domain, stack.round)} was handed over as {stack_name(domain, r)}")
    records = []
    try:
        for stack in stacks:
            records.append(install_stack(model, stack))
    except BaseException:
        unload_domain(model, domain)
        raise
    order = domain_order(manifest)
    for _, layer in named_stacked_layers(model):
        keys = list(layer.stacks)
        want = [d for d in order if d in layer.stacks] + [d for d in keys if d not in order]
        if keys != want:  # a ModuleDict keeps insertion order: rebuild it in the run's order
            layer.stacks = nn.ModuleDict((d, layer.stacks[d]) for d in want)
            layer.invalidate()
    return records


def unload_domain(model: nn.Module, domain: str) -> None:
    """Remove `domain`'s frozen stacks from every layer, and every fused pass built with them (a fused
    pass holds copies of its stacks' matrices, and `pass_key` does not see the stacks change): once the
    caller drops its own references, their memory is free."""
    for _, layer in named_stacked_layers(model):
        if domain in layer.stacks:
            del layer.stacks[domain]
            layer.invalidate()
