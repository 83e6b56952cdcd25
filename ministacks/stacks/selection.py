"""Which frozen stacks run, and with which weight: `StacksOn`, the one description every mode and route uses.

docs/brainstacks.md §6. A stacked projection computes y = base(x) + Σ_d w_d · Σ_{stacks j of d} Δ_j(x); a
StacksOn gives the w_d. A domain at or below `SKIP_THRESHOLD` (0.12, the paper's inference rule) is
skipped entirely: no compute at all, and (in the offloaded engine) no memory.

Per row. Routed evaluation gives every prompt its own weights. `StacksOn.per_row` gives row b of a
batch its own StacksOn, so prompts routed apart still share one forward: the stacks live in any row
run for the whole batch, and each row's delta is scaled by that row's weight (0 where its setting skips
the domain). It decides the frozen stacks only; an active stack runs in every row alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SKIP_THRESHOLD = 0.12  # a domain whose weight is at or below this costs nothing (docs/brainstacks.md §6, inference rule)


@dataclass(frozen=True)
class StacksOn:
    """Which frozen stacks run, and with which weight.

        StacksOn.ungated()            every domain's stacks at weight 1 (what continual training measures)
        StacksOn.weighted({d: w})     those domains at those weights; a domain absent is 0, and one at or
                                      below SKIP_THRESHOLD is skipped (it costs nothing)
        StacksOn.base_only()          nothing but the base: no frozen and no active stack
        StacksOn.per_row([on, ...])   row b of the batch under the b-th setting (routed prompts in one batch)

    `as_json()` is how results record it: None (ungated), {} (base) or the weights, as eval.json and
    the CLI print them."""

    weights: tuple[tuple[str, float], ...] | None = None  # None: ungated; else (domain, weight) pairs
    base: bool = False
    rows: tuple[StacksOn, ...] | None = None  # per_row: one setting per batch row

    @classmethod
    def ungated(cls) -> StacksOn:
        return cls()

    @classmethod
    def base_only(cls) -> StacksOn:
        return cls(weights=(), base=True)

    @classmethod
    def weighted(cls, weights: dict[str, float]) -> StacksOn:
        return cls(weights=tuple((d, float(w)) for d, w in weights.items()))

    @classmethod
    def per_row(cls, rows: Sequence[StacksOn]) -> StacksOn:
        """Row b of the batch runs rows[b]; rows that are all one setting give that setting itself."""
        rows = tuple(rows)
        if not rows:
            raise ValueError("per_row needs a setting for at least one row")
        if any(not isinstance(r, StacksOn) or r.rows is not None for r in rows):
            raise TypeError("per_row takes one plain StacksOn per row")
        return rows[0] if len(set(rows)) == 1 else cls(weights=(), rows=rows)

    @classmethod
    def from_json(cls, weights: dict[str, float] | None) -> StacksOn:
        """The inverse of as_json: None is ungated, {} the base alone, a dict those weights."""
        if weights is None:
            return cls.ungated()
        return cls.weighted(weights) if weights else cls.base_only()

    def weight_of(self, domain: str) -> float:
        """The domain's weight (for a per-row setting, use row_weights: there is one per row)."""
        if self.rows is not None:
            raise TypeError("a per-row StacksOn has one weight per row: use row_weights")
        if self.base:
            return 0.0
        return 1.0 if self.weights is None else dict(self.weights).get(domain, 0.0)

    def row_weights(self, domain: str) -> list[float]:
        """The domain's weight in each row (0 where the row's setting skips it); one entry unless per_row."""
        rows = self.rows if self.rows is not None else (self,)
        return [w if w > SKIP_THRESHOLD else 0.0 for w in (r.weight_of(domain) for r in rows)]

    def is_live(self, domain: str) -> bool:
        """Does the domain's stacks run at all (above the skip threshold in some row)?"""
        return any(w > 0.0 for w in self.row_weights(domain))

    def live(self, domains: Iterable[str]) -> list[str]:
        """The domains of `domains` whose stacks run, in their order."""
        return [d for d in domains if self.is_live(d)]

    def as_json(self) -> dict[str, float] | list | None:
        if self.rows is not None:
            return [r.as_json() for r in self.rows]
        if self.base:
            return {}
        return None if self.weights is None else dict(self.weights)
