"""Outcome-based targets for the meta-router (spec §6): which stacks *actually* help a prompt.

A domain label says where a prompt came from, not which stacks lower its loss. The oracle measures
it: for a prompt with an answer, the loss on the answer under every combination of domain stacks
(each domain in the combination at weight 1, the others off), and the best combination wins.

    exhaustive (default, D ≤ 5):   all 2^D − 1 combinations, each evaluated on the whole batch at once
                                   (31 batched passes for 5 domains, instead of a pass per prompt); the
                                   winner minimises loss + 0.01·|combination|: as in the greedy search,
                                   every domain switched on must pay for itself by 0.01
    greedy (the released code):    best single domain if it beats the base; then add a domain when it
                                   lowers the loss by more than 0.01, until none does

Then, per prompt (released code's rules):

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
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from .router import RouterConfig
from .stacks import stack_setting
from .train import ExampleSet, example_losses

BASE = ()  # the empty combination: every stack off


def combo_name(combo: Sequence[str]) -> str:
    return "+".join(combo) if combo else "base"


def all_combinations(domains: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset, in domain order: (chat,), (code,), ..., (chat, code), ..."""
    return [c for k in range(1, len(domains) + 1) for c in itertools.combinations(domains, k)]


class ComboLosses:
    """Per-example losses under stack combinations, each computed once on the whole ExampleSet."""

    def __init__(self, model: nn.Module, data: ExampleSet):
        empty = int((data.scored == 0).sum())
        if empty:  # its loss would be 0 under every combination, and the base would "win" it
            raise ValueError(f"{empty} example(s) have no scored token (the answer does not fit in the context): "
                             "leave them out (see routing.answerable)")
        self.model, self.data = model, data
        self.table: dict[tuple[str, ...], torch.Tensor] = {}  # combination -> [N]

    def __call__(self, combo: tuple[str, ...]) -> torch.Tensor:
        if combo not in self.table:
            with stack_setting(self.model, {d: 1.0 for d in combo}, base_only=combo == BASE):
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
    """The released code's search, per example (combinations evaluated lazily, each on the whole batch)."""
    base = losses(BASE)
    singles = torch.stack([losses((d,)) for d in domains])  # [D, N]
    best = []
    for i in range(len(base)):
        j = int(singles[:, i].argmin())
        if singles[j, i] >= base[i]:
            best.append(BASE)
            continue
        chosen, current = [domains[j]], float(singles[j, i])
        improved = True
        while improved:
            improved = False
            for d in domains:
                if d in chosen:
                    continue
                trial = tuple(x for x in domains if x in chosen or x == d)
                loss = float(losses(trial)[i])
                if loss < current - min_gain:
                    chosen, current, improved = list(trial), loss, True
                    break  # first improvement
        best.append(tuple(chosen))
    return best


def find_targets(losses: ComboLosses, labels: Sequence[str], domains: Sequence[str],
                 cfg: RouterConfig = RouterConfig()) -> OracleResult:
    """Search the best combination for every example (`labels`: each one's domain) and build targets.
    `losses(combo)` gives every example's loss under a combination (ComboLosses on a model and data)."""
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
