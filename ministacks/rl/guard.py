"""The guard against RL blow-ups: the paper's GRPO run on code reached a loss of ~2.8e7 and ruined every
stack trained on top of it (docs/brainstacks.md §8). Each RL step is checked before its update lands:

    non-finite     a loss, gradient norm or reward that is inf or nan
    jump           |value| > jump × max(running median of |value| over the last `window` steps, floor)
                   for the loss and the (pre-clip) gradient norm, once `window` steps are in
    out of range   a reward outside [reward_min, reward_max] (every reward here is 0 or 1: anything
                   else is a broken reward function, not a signal)

A step that trips any of them is not taken: RL stops, the last good stack (the weights of the last step
whose checks passed) is restored, and the result says which check, at which step. The floor keeps a
loss that hovers near 0 (GRPO's: the advantages have mean zero) from tripping on ordinary noise.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class GuardConfig:
    jump: float = 10.0  # a value this many times its running median is a blow-up, not a step
    floor: float = 1.0  # the running median's least value in that rule (losses and norms of order 1)
    window: int = 5  # steps of history before the jump rule applies
    reward_min: float = 0.0
    reward_max: float = 1.0


class BlowUpGuard:
    """Running history of the checked quantities; `problem(...)` says what is wrong with a step, or None."""

    def __init__(self, cfg: GuardConfig = GuardConfig(), history: dict[str, list[float]] | None = None):
        self.cfg = cfg
        self.history = {k: deque(v, maxlen=cfg.window) for k, v in (history or {}).items()}

    def problem(self, values: dict[str, float], rewards: list[float] = ()) -> str | None:
        for name, value in values.items():
            if not math.isfinite(value):
                return f"{name} is {value}"
            seen = self.history.get(name, ())
            if len(seen) == self.cfg.window:
                median = statistics.median(abs(v) for v in seen)
                if abs(value) > self.cfg.jump * max(median, self.cfg.floor):
                    return (f"{name} {value:.4g} jumped past {self.cfg.jump:g} x its running median "
                            f"{median:.4g} (floor {self.cfg.floor:g})")
        for r in rewards:
            if not math.isfinite(r) or not self.cfg.reward_min <= r <= self.cfg.reward_max:
                return f"a reward of {r} is outside [{self.cfg.reward_min:g}, {self.cfg.reward_max:g}]"
        return None

    def accept(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.history.setdefault(name, deque(maxlen=self.cfg.window)).append(value)

    def state(self) -> dict[str, list[float]]:
        """The history as JSON (a checkpoint keeps it: a resumed run judges the next step alike)."""
        return {k: list(v) for k, v in self.history.items()}
