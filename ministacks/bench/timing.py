"""One timing loop for every benchmark: interleaved rounds under a time budget, medians and their spread.

Every benchmark in ministacks.bench compares variants of one computation (the base against the base with
stacks, fp32 against NF4, LoRA against MoE-LoRA, ...) on a machine that is often shared: 2 cores, and
other processes that want them. They all measure the same way, with `time_interleaved`:

    rounds 1 .. warmup        every variant once, untimed      (first allocations, AdamW's state, caches)
    then, round after round   every variant once, timed:       a, b, c, a, b, c, ...
    stop                      after `rounds` timed rounds, or as soon as `budget_s` has passed since the
                              start (warm-up included) and at least `min_rounds` timed rounds ran

Why interleaved: another process that takes the cores for a few seconds then slows every variant of
the rounds it lands in, instead of all the runs of one variant, so the ratios between variants survive
it. Why the median: a run that lost its cores is an outlier, and the median ignores it. The fastest
run is kept too, and

    spread = median / fastest        (per variant; 1.0 = every run took the same time)

says how noisy the measurement was: above SPREAD_WARNING the cores were busy, and the ratios are not
to be trusted. A load that is steady through the whole run slows every run alike, so the spread cannot
show it; the 1-minute load average before the run (`load_average`) is the second warning. `busy_machine`
applies both thresholds; each benchmark's report words the warning for what it measured.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

SPREAD_WARNING = 1.25  # median / fastest above this: the cores were busy with other work during the run
LOAD_WARNING = 1.0  # 1-minute load average above this before the run: other processes were using the cores


def median(values: Sequence[float]) -> float:
    """The middle value; for an even count the upper of the two middle ones, so it is always a value that
    was measured (a run), not the mean of two."""
    if not values:
        raise ValueError("median of no values: time at least one round")
    return sorted(values)[len(values) // 2]


@dataclass
class Timings:
    """What `time_interleaved` measured: every timed run of every variant, and the statistics of them."""

    seconds: dict[str, list[float]]  # variant -> wall seconds of its timed runs, in the order they ran
    results: dict[str, list]  # variant -> what its timed runs returned, for the variants asked to `keep`

    @property
    def rounds(self) -> int:
        """Timed rounds that ran (every variant ran once in each)."""
        return len(next(iter(self.seconds.values())))

    @property
    def median(self) -> dict[str, float]:
        return {k: median(v) for k, v in self.seconds.items()}

    @property
    def fastest(self) -> dict[str, float]:
        return {k: min(v) for k, v in self.seconds.items()}

    @property
    def spread(self) -> dict[str, float]:
        """median / fastest of each variant: 1.0 = perfectly steady."""
        med, best = self.median, self.fastest
        return {k: med[k] / best[k] for k in self.seconds}


def time_interleaved(fns: Mapping[str, Callable[[], Any]], rounds: int, *, warmup: int = 0,
                     budget_s: float | None = None, min_rounds: int = 3, rotate: bool = False,
                     prepare: Mapping[str, Callable[[], Any]] | None = None, keep: Collection[str] = (),
                     clock: Callable[[], float] = time.perf_counter) -> Timings:
    """Call every fn once a round, in turn, for `warmup` untimed rounds and up to `rounds` timed ones.

    fns        variant name -> a callable without arguments: one run of that variant
    rounds     the most timed rounds
    warmup     untimed rounds first (a first call pays for allocations and thread start-up)
    budget_s   stop after the first timed round that ends more than budget_s seconds after the start (the
               warm-up counts), once at least `min_rounds` timed rounds ran; None: always `rounds` rounds
    rotate     round i starts at the (i mod n)-th variant, so that no variant always runs first (just after
               the slowest one, or on a cache the previous one warmed)
    prepare    variant name -> a callable run just before each of its runs, outside the timing (switching
               the model into that variant's mode)
    keep       variants whose timed runs' return values are kept in `Timings.results`; the others' are
               dropped at once, so that a forward's logits do not pile up in memory
    clock      seconds, monotonic; a test plants a fake one
    """
    names = list(fns)
    if not names:
        raise ValueError("time_interleaved got no variants to time: pass a dict {name: callable}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1 (one timed run of every variant), got {rounds}")
    prepare = prepare or {}
    unknown = (set(keep) | set(prepare)) - set(names)
    if unknown:
        raise ValueError(f"keep / prepare name variants that are not timed: {sorted(unknown)}; "
                         f"the variants are {names}")
    seconds = {k: [] for k in names}
    results = {k: [] for k in keep}
    start = clock()
    for i in range(warmup + rounds):
        first = i % len(names) if rotate else 0
        for name in names[first:] + names[:first]:
            if name in prepare:
                prepare[name]()
            t0 = clock()
            out = fns[name]()
            t = clock() - t0
            if i >= warmup:
                seconds[name].append(t)
                if name in results:
                    results[name].append(out)
            del out  # not kept alive while the next variant runs
        timed = i + 1 - warmup
        if budget_s is not None and timed >= min_rounds and clock() - start > budget_s:
            break
    return Timings(seconds, results)


# -- was the machine busy? ------------------------------------------------------------------------------


def load_average() -> float | None:
    """The 1-minute load average (runnable processes, averaged), or None where the OS does not tell.

    Taken before a benchmark starts, it is the other processes' demand for the cores: on 2 cores a load
    of 1 means one core was, on average, already taken."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # no getloadavg (Windows), or the OS could not give it
        return None


class Busy(NamedTuple):
    """Why a benchmark's numbers may not be trusted; each field is None when there is nothing to say."""

    spread: float | None  # the worst median / fastest, when above SPREAD_WARNING
    load: float | None  # the load average before the run, when above LOAD_WARNING


def busy_machine(spreads: Iterable[float], load: float | None = None) -> Busy:
    """Apply the two thresholds to a benchmark's spreads (one per variant) and its load before the run."""
    worst = max(spreads, default=1.0)
    return Busy(spread=worst if worst > SPREAD_WARNING else None,
                load=load if load is not None and load > LOAD_WARNING else None)
