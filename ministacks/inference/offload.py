"""The disk-offloaded inference engine (docs/brainstacks.md §7; the paper's §6.3): the base and the router stay in memory,
each prompt's domains come from disk when it needs them.

    prompt ──► router (resident) ──► the domains it switches on ──► in the cache? ── yes: a hit ──► answer
                                                                          │ no: a miss
                                                                          ▼
                       over budget? unload the least recently used domain the prompt does not need
                                                                          ▼
                       RUN/stacks/{domain}_r01.safetensors, _r02, ... ──► stacks/domains.load_domain

A domain is loaded whole (all its rounds: a domain's answer is the sum of its stacks) and dropped
whole, and its stacks always go into the layers' `stacks[domain]`, looked up by the domain each file's
own record names. The released engine kept its loaded stacks in a list and handed out the router's
weights by position, so a domain loaded out of order was weighted with another domain's weight; here
the order in which domains come and go cannot change a weight (tests/test_engine.py checks the logits
against a model that holds every stack).

This file implements
  - `StackCache`   : which domains are in the model, under a byte budget, least recently used out first;
                     optional prefetch (the next prompt's domains read from disk on a thread while the
                     current one is answered); counts hits, misses, evictions and each load's time
  - `EngineStats`  : those counts, and the router's time per prompt
  - `live_domains` : the domains a StacksOn actually runs (the ones the cache must hold)

The budget counts the stacks' own tensors (`stack_bytes`, from each record: nothing is read to know a
domain's size). It leaves out the base and the router, which are always there, the fused pass a layer
builds from its live stacks (rebuilt at every new route, freed with its stacks), and a domain read
ahead by prefetch, held outside the model until it is needed (at most the domains of one prompt).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..stacks.domains import domain_order, domain_rounds, load_domain, stack_bytes, unload_domain
from ..stacks.fingerprint import base_fingerprint
from ..stacks.layer import StacksOn
from ..stacks.store import (ForeignBaseError, StackFile, StackFileError, check_stack_size, damaged_stacks,
                            read_stack)

MB = 2**20


@dataclass
class EngineStats:
    """What the engine did over a stream of prompts. A request is one domain one prompt needs: a hit if
    it was in memory, a miss if it had to be loaded."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    loads: list[dict[str, Any]] = field(default_factory=list)  # one per loaded domain: domain, stacks, bytes, seconds
    route_seconds: list[float] = field(default_factory=list)  # the router's time (feature pass + network) per prompt

    @property
    def hit_rate(self) -> float | None:
        n = self.hits + self.misses
        return self.hits / n if n else None

    def seconds_per_stack(self) -> float | None:
        """The mean time to read, check and install one stack, over the domains read from disk on demand
        (a prefetched domain was read on the thread: its load is only the install)."""
        loads = [load for load in self.loads if not load["prefetched"]]
        n = sum(load["stacks"] for load in loads)
        return sum(load["seconds"] for load in loads) / n if n else None

    def summary(self) -> str:
        """One line for a person: `chat`'s /stats and the end of `generate`."""
        if not self.hits + self.misses:
            return "no stacks needed yet"
        per_stack = self.seconds_per_stack()
        route = (f"; router {1000 * sum(self.route_seconds) / len(self.route_seconds):.1f} ms a prompt"
                 if self.route_seconds else "")
        return (f"{self.hits} hits, {self.misses} misses (hit rate {self.hit_rate:.0%}), {self.evictions} evictions"
                + (f"; {1000 * per_stack:.1f} ms to load a stack" if per_stack is not None else "") + route)


def live_domains(on: StacksOn, domains: Iterable[str]) -> list[str]:
    """The domains whose stacks `on` runs, among `domains` (the run's): none for the base, all of them
    ungated, and those above the skip threshold for given weights (a domain at or below it costs nothing,
    so it need not be in memory)."""
    return on.live(domains)


class StackCache:
    """The stacks of a run's domains in `model`, loaded on demand from RUN/stacks under `budget_bytes`
    (None: no limit, a domain is loaded the first time a prompt needs it and stays).

    `need(domains)` before a prompt is answered makes exactly those domains resident (and maybe others
    the budget still holds, which the prompt's weights switch off). `prefetch(domains)` starts reading
    the next prompt's domains on a thread; `need` then only installs them."""

    def __init__(self, run: str | Path, model: nn.Module, manifest: dict[str, Any], budget_bytes: int | None = None,
                 prefetch: bool = False):
        if budget_bytes is not None and budget_bytes <= 0:
            raise ValueError(f"the stack memory budget must be positive, not {budget_bytes} bytes")
        self.run, self.model, self.manifest, self.budget = Path(run), model, manifest, budget_bytes
        self.domains = tuple(domain_order(manifest))
        self.model_fp = base_fingerprint(model)  # once: hashing the base costs more than a load
        if manifest.get("base_fingerprint") not in (None, self.model_fp):
            raise ForeignBaseError(self.run / "manifest.json", f"this run was trained on base "
                                   f"{manifest['base_fingerprint']}, the model's base is {self.model_fp}")
        self.sizes = self._sizes()
        self.resident: OrderedDict[str, int] = OrderedDict()  # domain -> bytes, least recently used first
        self.stats = EngineStats()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") if prefetch else None
        self._pending: dict[str, Future] = {}

    @property
    def used_bytes(self) -> int:
        return sum(self.resident.values())

    def need(self, domains: Iterable[str]) -> None:
        """Make every domain in `domains` resident, evicting least recently used others if the budget says
        so. ValueError for a domain the run has no stacks for, or a set of domains the budget cannot hold
        together (then nothing changes)."""
        domains = list(dict.fromkeys(domains))
        unknown = [d for d in domains if d not in self.sizes]
        if unknown:
            raise ValueError(f"no stacks for {', '.join(unknown)} in {self.run}; it has {', '.join(self.domains)}")
        total = sum(self.sizes[d] for d in domains)
        if self.budget is not None and total > self.budget:
            raise ValueError(f"this prompt needs {', '.join(domains)}: {total / MB:.1f} MB of stacks, over the "
                             f"{self.budget / MB:.1f} MB budget; raise the budget or switch fewer domains on")
        for d in domains:
            if d in self.resident:
                self.stats.hits += 1
                self.resident.move_to_end(d)  # now the most recently used
            else:
                self.stats.misses += 1
        for d in domains:
            if d not in self.resident:
                self._make_room(self.sizes[d], keep=set(domains))
                self._load(d)

    def prefetch(self, domains: Iterable[str]) -> None:
        """Start reading `domains` from disk (those not in memory nor already on their way). Does nothing
        without prefetch. A file that fails to read raises when `need` asks for its domain."""
        if self._pool is None:
            return
        for d in domains:
            if d in self.sizes and d not in self.resident and d not in self._pending:
                self._pending[d] = self._pool.submit(self._read, d)

    def close(self) -> None:
        """Stop the prefetch thread (after the reads under way)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pending.clear()

    # -- inside ----------------------------------------------------------------------------------------
    def _sizes(self) -> dict[str, int]:
        """Each domain's bytes, from its checked records. What can be checked without reading a tensor is
        checked here, so that a missing, truncated or edited stack refuses the run before the first answer,
        as `load_all_stacks` does; a flipped byte inside a tensor file shows when its domain is loaded."""
        sizes, problems, first = {}, [], None
        for d in self.domains:
            sizes[d] = 0
            for r in domain_rounds(self.manifest, d):
                try:
                    sizes[d] += stack_bytes(self.model, check_stack_size(self.run, d, r))
                except StackFileError as e:
                    problems.append(str(e))
                    first = first or (d, r)
        if problems:
            raise damaged_stacks(self.run, problems, first)
        return sizes

    def _read(self, domain: str) -> dict[int, StackFile]:
        """Every round of `domain` read from disk and checked; a damaged file is the run's one message
        (DamagedStacksError, as `load_all_stacks` words it), with the repair from that stack."""
        read = {}
        for r in domain_rounds(self.manifest, domain):
            try:
                read[r] = read_stack(self.run, domain, r, self.model_fp)
            except StackFileError as e:
                raise damaged_stacks(self.run, [str(e)], (domain, r)) from None
        return read

    def _make_room(self, n_bytes: int, keep: set[str]) -> None:
        """Evict least recently used domains outside `keep` until `n_bytes` more fit (`need` has checked
        that the kept domains fit together, so there is always one to evict while they do not)."""
        while self.budget is not None and self.used_bytes + n_bytes > self.budget:
            victim = next(d for d in self.resident if d not in keep)
            unload_domain(self.model, victim)
            del self.resident[victim]
            self.stats.evictions += 1

    def _load(self, domain: str) -> None:
        start = time.perf_counter()
        pending = self._pending.pop(domain, None)
        read = pending.result() if pending is not None else self._read(domain)  # prefetched: only the install is left
        try:
            records = load_domain(self.run, self.model, self.manifest, domain, self.model_fp, read=read)
        except StackFileError as e:  # a record that does not fit this model
            raise damaged_stacks(self.run, [str(e)], (domain, domain_rounds(self.manifest, domain)[0])) from None
        self.resident[domain] = self.sizes[domain]
        self.stats.loads.append({"domain": domain, "stacks": len(records), "bytes": self.sizes[domain],
                                 "seconds": time.perf_counter() - start, "prefetched": pending is not None})
