"""Measuring a run in one mode: which stacks are on, the loss, exact greedy accuracy, generated answers.

A mode (inference.stacked.MODES) is either one setting of the stacks for every prompt — base, ungated —
or one setting per prompt, from the router: routed (the paper's p-weighted rule) and switched (the
same domains at weight 1). `Weights` holds both forms: `on` for the first, `per_prompt` for the second
(example i of a list runs under per_prompt[i], in a batch whose rows each have their own weights). Every measurement here takes one and runs
unchanged in either form, so the four modes are measured by the same code on the same examples:

    mean_loss        token-weighted mean CE of examples (the validation loss of training, §4)
    exact_accuracy   share of examples whose greedy answer is the reference, by teacher forcing (forced.py)
    text_losses      per-document CE of plain text (the general held-out prose), and its paired interval
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..data import Example
from ..inference.stacked import ROUTED_MODES, StackedRun, at_full_weight
from ..routing.oracle import combo_name, shares
from ..routing.router import routing_weights
from ..stacks.layer import StacksOn, set_stacks, stacks_on
from ..training.examples import ExampleSet, example_losses
from .forced import BATCH_SIZE, greedy_matches
from .tasks import Z_95

@dataclass(frozen=True)
class Weights:
    """One StacksOn for every prompt (`on`), or one stack-weight dict per prompt (`per_prompt`)."""

    on: StacksOn | None = None
    per_prompt: list[dict[str, float]] | None = None

    def take(self, rows: Sequence[int]) -> Weights:
        """The weights of the prompts at `rows` (a measurement on some of the routed prompts)."""
        return self if self.per_prompt is None else Weights(per_prompt=[self.per_prompt[i] for i in rows])

    def of(self, i: int) -> StacksOn:
        return self.on if self.per_prompt is None else StacksOn.weighted(self.per_prompt[i])

    def repeat(self, k: int) -> Weights:
        """Each prompt's weights k times over, in order (k candidates of one prompt, all under its route)."""
        return self if self.per_prompt is None else Weights(per_prompt=[w for w in self.per_prompt for _ in range(k)])

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[Callable[[list[int]], None] | None]:
        """Run a batched measurement under these weights: the model under `on` for the block, or, per prompt,
        the `before_batch(rows)` to pass: it sets row j of the batch to prompt rows[j]'s weights
        (StacksOn.per_row), so prompts routed apart share a batch. Whatever the batches set is undone after
        the block."""
        with stacks_on(model, self.on if self.per_prompt is None else StacksOn.ungated()):
            yield None if self.per_prompt is None else (
                lambda rows: set_stacks(model, StacksOn.per_row([self.of(i) for i in rows])))


def mode_weights(sr: StackedRun, mode: str, raw_prompts: Sequence[str]) -> Weights:
    """The stacks `mode` runs for each of `raw_prompts` (raw text, as the router reads it). The router's
    probabilities are computed once per prompt: switched mode uses routed mode's domains at weight 1."""
    if mode not in ROUTED_MODES:
        return Weights(on=sr.stacks_for(mode))
    if not raw_prompts:  # nothing to route (no HumanEval problem fits the context, say)
        return Weights(per_prompt=[])
    weights = [routing_weights(p, sr.router.cfg) for p in sr.probabilities(list(raw_prompts))]
    return Weights(per_prompt=weights if mode == "routed" else [at_full_weight(w) for w in weights])


def route_summary(domains: tuple[str, ...], weights: list[dict[str, float]]) -> dict:
    """Each domain's mean weight over the prompts (0 where it was off) and the share of each switched-on set."""
    return {"mean_weight": {d: sum(w.get(d, 0.0) for w in weights) / max(1, len(weights)) for d in domains},
            "shares": shares([combo_name([d for d in domains if d in w]) for w in weights])}


def _losses(sr: StackedRun, data: ExampleSet, weights: Weights) -> tuple[torch.Tensor, float]:
    """example_losses of `data` under `weights`, and their token-weighted mean:

        loss = Σ_i n_i · ℓ_i / Σ_i n_i        ℓ_i example i's mean CE, n_i its scored tokens

    which is example_loss's definition, the validation loss of training and of the forgetting matrix."""
    with weights.applied(sr.model) as before_batch:
        losses = example_losses(sr.model, data, before_batch=before_batch)
    return losses, float((losses * data.scored).sum() / data.scored.sum().clamp(min=1))


def mean_loss(sr: StackedRun, examples: list[Example], cfg, weights: Weights) -> float:
    """Token-weighted mean loss of `examples` (cfg: the run's StackTrainConfig, for the loss's form)."""
    data = ExampleSet(sr.tok, examples, cfg.completion_only, max_len=cfg.seq_len,
                      batch_size=cfg.eval_batch_size)
    return _losses(sr, data, weights)[1]


def exact_accuracy(sr: StackedRun, examples: list[Example], weights: Weights, repetition_penalty: float) -> dict:
    """How many of `examples` greedy decoding answers with exactly the reference response (forced.py):
    {"correct", "n", "by_source": {source: {"correct", "n"}}}; an example whose prompt and response do not
    fit the context is left out of n, in every mode alike (it depends on the text alone)."""
    with weights.applied(sr.model) as before_batch:
        verdicts = greedy_matches(sr.model, sr.tok, examples, repetition_penalty,
                                  batch_size=BATCH_SIZE, before_batch=before_batch)
    by_source: dict[str, dict[str, int]] = {}
    for ex, v in zip(examples, verdicts):
        if v is not None:
            s = by_source.setdefault(ex.source, {"correct": 0, "n": 0})
            s["correct"] += v
            s["n"] += 1
    return {"correct": sum(s["correct"] for s in by_source.values()), "n": sum(s["n"] for s in by_source.values()),
            "by_source": dict(sorted(by_source.items()))}


def text_losses(sr: StackedRun, texts: list[str], weights: Weights, max_len: int, batch_size: int) -> dict:
    """Every document's mean CE over all its tokens (plain text, no template) and its token count, in order:
    {"loss" (token-weighted mean), "losses", "tokens"}."""
    data = ExampleSet.of_texts(sr.tok, texts, max_len, batch_size)
    losses, loss = _losses(sr, data, weights)
    return {"loss": loss, "losses": [float(x) for x in losses], "tokens": data.scored.tolist()}


def paired_difference(a: dict, b: dict) -> dict:
    """Token-weighted mean loss of b minus a's, on the same documents, with a 95% interval.

    d_i = ℓ_b,i − ℓ_a,i per document, weights n_i (its tokens); the difference of the two token-weighted
    means is D = Σ n_i d_i / Σ n_i, and treating documents as the sampled units (a ratio estimator),

        se(D) = sqrt(Σ n_i² (d_i − D)²) / Σ n_i,        95% interval D ± 1.96 · se(D)

    Paired, because both modes read the same documents: a document that is hard for one is hard for the
    other, and most of the per-document spread cancels in d_i."""
    n = a["tokens"]
    if n != b["tokens"] or not n:
        raise ValueError("a paired difference needs the same documents in both measurements")
    d = [lb - la for la, lb in zip(a["losses"], b["losses"])]
    total = sum(n)
    mean = sum(ni * di for ni, di in zip(n, d)) / total
    se = math.sqrt(sum((ni * (di - mean)) ** 2 for ni, di in zip(n, d))) / total
    return {"difference": mean, "ci95_low": mean - Z_95 * se, "ci95_high": mean + Z_95 * se, "documents": len(n)}
