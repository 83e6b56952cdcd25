"""Outcome-based targets for the meta-router (docs/brainstacks.md §6): which stacks *actually* help a prompt.

A domain label says where a prompt came from, not which stacks lower its loss. The oracle measures
it: for a prompt with an answer, the loss on the answer under combinations of domain stacks, and the
best combination wins. A combination is a set of domains; it runs each of them at weight 1, the others
off — and chat at max(w_chat, 0.2) whenever any stack is on, because inference never runs chat below
its floor (router.routing_weights): so "math" is evaluated as {math: 1, chat: 0.2}, the configuration
the router would actually produce for it (released code; `RouterConfig.oracle_chat_floor=False` runs
chat only when it is in the set). The base (no stack at all) is the reference every search starts from.

    exhaustive (default, D ≤ 5)   every subset of the domains, and the base: 2^D configurations, each
                                  evaluated on the whole batch at once (32 batched passes for 5 domains,
                                  instead of a pass per prompt). The winner minimises
                                  loss + 0.01·|combination|: as in the greedy search, every domain
                                  switched on must pay for itself by 0.01.

    greedy (the released code)    per prompt, exactly as the released code searches:
        best single domain j; if its loss is not below the base's, the base wins and the search ends
        chosen = {j}, best = loss(j)
        repeat (a "pass"):
            for d in the domains in index order, skipping chosen ones:
                if loss(chosen ∪ {d}) < best − 0.01:  chosen ∪= {d}; best = loss(chosen)
                (the pass goes on with the next domain on top of the combination as updated: it does
                 not restart from the first domain after an acceptance)
        until a pass accepts nothing

Then, per prompt, whichever search found the winner (released code's rules):

    found_d   = 1 if d is in the best combination else 0            (all 0 if nothing beats the base)
    found_r   = 0.5 if reasoning is not in it but adding it lowers the loss at all
    found_chat = max(found_chat, 0.2)                                  (chat is never fully off)
    target    = clamp(0.8 · found + 0.2 · one-hot(domain label), 0, 1)

The losses of every combination are kept (`OracleResult.losses`), so the shares of winning
combinations per domain — the paper's "medical prompts route to chat+math in 97% of cases" — can be
measured on our own data.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn as nn

from .router import RouterConfig
from ..stacks.layer import StacksOn, stacks_on
from ..training.examples import ExampleSet, example_losses

BASE = ()  # the empty combination: every stack off


def combo_name(combo: Sequence[str]) -> str:
    return "+".join(combo) if combo else "base"


def all_combinations(domains: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset, in domain order: (chat,), (code,), ..., (chat, code), ..."""
    return [c for k in range(1, len(domains) + 1) for c in itertools.combinations(domains, k)]


def combo_weights(combo: Sequence[str], chat_floor: float | None) -> dict[str, float]:
    """The stack weights a combination runs with: its domains at 1, chat at least `chat_floor` when any
    stack is on (None: no floor). The base, (), is {}: every stack off."""
    weights = {d: 1.0 for d in combo}
    if combo and chat_floor is not None:
        weights["chat"] = max(weights.get("chat", 0.0), chat_floor)
    return weights


class ComboLosses:
    """Per-example losses under stack combinations, each computed once on the whole ExampleSet.

    `chat_floor`: chat's weight in every non-empty combination is at least this (None: no floor); a run
    without a chat domain has nothing to floor. `switch(model, on)`: the context in which the model runs
    as StacksOn `on` says — the stacks' own `stacks_on` by default; PSN's capability blocks bring theirs."""

    def __init__(self, model: nn.Module, data: ExampleSet, chat_floor: float | None = None,
                 switch: Callable[[nn.Module, StacksOn], AbstractContextManager] = stacks_on):
        empty = int((data.scored == 0).sum())
        if empty:  # its loss would be 0 under every combination, and the base would "win" it
            raise ValueError(f"{empty} example(s) have no scored token (the answer does not fit in the context): "
                             "leave them out (see stages.route.answerable)")
        self.model, self.data, self.chat_floor, self.switch = model, data, chat_floor, switch
        self.table: dict[tuple[str, ...], torch.Tensor] = {}  # combination -> [N]

    @classmethod
    def from_table(cls, table: dict[tuple[str, ...], torch.Tensor]) -> ComboLosses:
        """Losses already measured (an OracleResult's): asking for a combination not in `table` is an error."""
        losses = cls.__new__(cls)
        losses.model, losses.data, losses.chat_floor, losses.table = None, None, None, dict(table)
        return losses

    def __call__(self, combo: tuple[str, ...]) -> torch.Tensor:
        if combo not in self.table:
            if self.model is None:
                raise KeyError(f"combination {combo_name(combo)} was never measured")
            on = StacksOn.base_only() if combo == BASE else StacksOn.weighted(combo_weights(combo, self.chat_floor))
            with self.switch(self.model, on):
                self.table[combo] = example_losses(self.model, self.data)
        return self.table[combo]


@dataclass
class OracleResult:
    domains: tuple[str, ...]
    best: list[tuple[str, ...]]  # per example: the winning combination (BASE if nothing beats the base)
    found: torch.Tensor  # [N, D] before the label mix: 1 / 0.5 (reasoning) / chat floor
    targets: torch.Tensor  # [N, D] the router's targets
    losses: dict[tuple[str, ...], torch.Tensor]  # every combination evaluated -> [N]

    def to_dict(self) -> dict:
        return {"domains": list(self.domains), "best": [list(b) for b in self.best],
                "found": self.found.tolist(), "targets": self.targets.tolist(),
                "losses": {combo_name(c): v.tolist() for c, v in self.losses.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> OracleResult:
        def combo(name: str) -> tuple[str, ...]:
            return BASE if name == "base" else tuple(name.split("+"))

        return cls(tuple(d["domains"]), [tuple(b) for b in d["best"]], torch.tensor(d["found"]),
                   torch.tensor(d["targets"]), {combo(k): torch.tensor(v) for k, v in d["losses"].items()})


def exhaustive_best(losses: ComboLosses, domains: Sequence[str], min_gain: float) -> list[tuple[str, ...]]:
    """Per example, the combination (the base, no stack, included) with the lowest loss + min_gain·size.

    Without the size term a domain that lowers the loss by 0.0001 would always be switched on, and the
    reasoning soft target ("helps, but not enough to be chosen") could never happen."""
    combos = [BASE, *all_combinations(domains)]
    table = torch.stack([losses(c) + min_gain * len(c) for c in combos])  # [C, N]
    return [combos[i] for i in table.argmin(0).tolist()]


def greedy_best(losses: ComboLosses, domains: Sequence[str], min_gain: float) -> list[tuple[str, ...]]:
    """The released code's search, per example (see the module docstring); combinations are evaluated
    lazily, each on the whole batch, so a combination two examples both try costs one pass."""
    base = losses(BASE)
    singles = torch.stack([losses((d,)) for d in domains])  # [D, N]
    best = []
    for i in range(len(base)):
        j = int(singles[:, i].argmin())
        if not singles[j, i] < base[i]:  # no single domain beats the base at all
            best.append(BASE)
            continue
        chosen, current = {domains[j]}, float(singles[j, i])
        accepted = True
        while accepted:  # one pass over the remaining domains, in index order
            accepted = False
            for d in domains:
                if d in chosen:
                    continue
                trial = tuple(x for x in domains if x in chosen or x == d)
                loss = float(losses(trial)[i])
                if loss < current - min_gain:  # accept, and go on with the next domain on top of it
                    chosen, current, accepted = set(trial), loss, True
        best.append(tuple(x for x in domains if x in chosen))
    return best


def find_targets(losses: ComboLosses, labels: Sequence[str], domains: Sequence[str],
                 cfg: RouterConfig = RouterConfig()) -> OracleResult:
    """Search the best combination for every example (`labels`: each one's domain) and build targets.
    `losses(combo)` gives every example's loss under a combination (ComboLosses on a model and data,
    built with `chat_floor=oracle_floor(cfg, domains)` so that its combinations run as inference would)."""
    domains = tuple(domains)
    if cfg.search == "exhaustive":
        best = exhaustive_best(losses, domains, cfg.min_gain)
    elif cfg.search == "greedy":
        best = greedy_best(losses, domains, cfg.min_gain)
    else:
        raise ValueError(f"unknown search {cfg.search!r}: use 'exhaustive' or 'greedy'")
    N, D = len(best), len(domains)
    found = torch.zeros(N, D)
    for i, combo in enumerate(best):
        for d in combo:
            found[i, domains.index(d)] = 1.0
        if "reasoning" in domains and "reasoning" not in combo:
            with_r = tuple(x for x in domains if x in combo or x == "reasoning")
            if float(losses(with_r)[i]) < float(losses(combo)[i]):
                found[i, domains.index("reasoning")] = cfg.reasoning_soft
    if "chat" in domains:
        c = domains.index("chat")
        found[:, c] = found[:, c].clamp(min=cfg.chat_floor)
    onehot = torch.zeros(N, D)
    onehot[torch.arange(N), torch.tensor([domains.index(lab) for lab in labels])] = 1.0
    targets = ((1 - cfg.label_weight) * found + cfg.label_weight * onehot).clamp(0, 1)
    return OracleResult(domains, best, found, targets, dict(losses.table))  # every combination evaluated


def oracle_floor(cfg: RouterConfig, domains: Sequence[str]) -> float | None:
    """The chat weight floor the oracle's combinations run with: the inference rule's, when the run has
    a chat domain and `cfg.oracle_chat_floor` is on; else None."""
    return cfg.chat_floor if cfg.oracle_chat_floor and "chat" in domains else None


def shares(names: Sequence[str]) -> dict[str, float]:
    """{name: its share of `names`}, the most frequent first (ties by name); {} for no names."""
    counts = sorted(((name, names.count(name)) for name in set(names)), key=lambda kv: (-kv[1], kv[0]))
    return {name: n / len(names) for name, n in counts}


def winning_shares(best: Sequence[tuple[str, ...]], labels: Sequence[str], domains: Sequence[str]) -> dict:
    """For each domain's prompts: {combination name: share of its prompts where it won}, largest first."""
    out = {}
    for d in domains:
        wins = [combo_name(b) for b, lab in zip(best, labels) if lab == d]
        out[d] = {"n": len(wins), "shares": shares(wins)}
    return out
