"""What stack training reads, and the one loss every stage measures (docs/brainstacks.md §4).

    training     `PackedExamples`: every training example as `<bos> prompt response <eos>`, packed into
                 one token stream (the paper packs); a step draws `batch_size` windows from it, at
                 starts that are a function of (seed, step) only, so a resumed round sees the same batches
    validation   `ExampleSet`: each example on its own (no packing: a window cut across two examples
                 would score one with the other's context), batched by length, right-padded

One loss definition everywhere: the validation loss of a domain is the token-weighted mean
cross-entropy over its validation examples, each example on its own, over all tokens of the
Alpaca-formatted text, or over the response tokens only with `completion_only`. Round results, the
forgetting matrix, the oracle's targets and the evaluation's test loss all use it (`example_loss`,
`example_losses`), so their numbers compare — the paper's Table 2 and forgetting matrix did not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Example
from ..lm.pretrain import window_starts
from ..lm.tokenizer import Tokenizer
from ..runtime import training_state

IGNORE = -100  # label of a token that is not scored


def encode_example(tok: Tokenizer, ex: Example, completion_only: bool, max_len: int) -> tuple[list[int], list[int]]:
    """`<bos> prompt response <eos>` and its labels (prompt tokens IGNOREd when completion_only)."""
    prompt = tok.encode(ex.prompt(), bos=True)
    response = tok.encode(ex.response, eos=True)
    ids = (prompt + response)[:max_len]
    labels = ([IGNORE] * len(prompt) if completion_only else list(prompt)) + response
    return ids, labels[:max_len]


class PackedExamples:
    """Training examples packed into one token stream (paper: packing); windows drawn per step."""

    def __init__(self, tok: Tokenizer, examples: Sequence[Example], completion_only: bool, seq_len: int):
        if not examples:
            raise ValueError("no training examples")
        ids, labels = [], []
        for ex in examples:
            i, lab = encode_example(tok, ex, completion_only, max_len=10**9)
            ids += i
            labels += lab
        self.ids, self.labels = torch.tensor(ids), torch.tensor(labels)
        self.seq_len = seq_len

    def batch(self, step: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = window_starts(len(self.ids), step, batch_size, self.seq_len, seed)
        x = torch.stack([self.ids[s : s + self.seq_len] for s in starts])
        y = torch.stack([self.labels[s : s + self.seq_len] for s in starts])
        return x, y


class ExampleSet:
    """Validation examples, tokenised once, batched by length (padding on the right is never scored)."""

    def __init__(self, tok: Tokenizer, examples: Sequence[Example], completion_only: bool, max_len: int,
                 batch_size: int = 32):
        self._batch([encode_example(tok, ex, completion_only, max_len) for ex in examples], tok.pad_id, batch_size)

    @classmethod
    def of_texts(cls, tok: Tokenizer, texts: Sequence[str], max_len: int, batch_size: int = 32) -> ExampleSet:
        """Plain documents, no template: `<bos> text <eos>` (cut at max_len), every token scored — the
        pretraining corpus's form, which the evaluation's general held-out text is measured in."""
        data = cls.__new__(cls)
        ids = [tok.encode(t, bos=True, eos=True)[:max_len] for t in texts]
        data._batch([(i, list(i)) for i in ids], tok.pad_id, batch_size)
        return data

    def _batch(self, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> None:
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))  # little padding per batch
        self.batches = []
        self.rows: list[list[int]] = []  # the examples (positions in the list given) of each batch
        for b in range(0, len(order), batch_size):
            self.rows.append(order[b : b + batch_size])
            chunk = [pairs[i] for i in order[b : b + batch_size]]
            T = max(len(ids) for ids, _ in chunk)
            x = torch.full((len(chunk), T), pad_id)
            y = torch.full((len(chunk), T), IGNORE)
            for row, (ids, lab) in enumerate(chunk):
                x[row, : len(ids)] = torch.tensor(ids)
                y[row, : len(lab)] = torch.tensor(lab)
            self.batches.append((x, y))
        # scored tokens per example, in the order given: weights of a token-weighted mean over examples
        self.scored = torch.tensor([sum(t != IGNORE for t in lab[1:]) for _, lab in pairs])


def logits_at(model: nn.Module, x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """The logits [N, V] at the N positions where `at` [B, T] is True, in row-major order. Our model computes
    the LM head (and the caller its softmax) there only — on a small model those are a large share of a
    forward, and a prompt's positions or the padding are never scored; any other model (a Hugging Face one)
    computes every position and is indexed."""
    if getattr(model, "logits_at_positions", False):
        return model(x, at=at).logits
    return model(x).logits[at]


def _scored_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE of every scored token [N], the row of each [N]) for a batch x, y [B, T] (labels aligned with
    the inputs: position t predicts y[:, t+1])."""
    target = y[:, 1:]
    scored = target != IGNORE  # [B, T-1]
    at = F.pad(scored, (0, 1), value=False)  # [B, T]: the positions whose next token is scored
    ce = F.cross_entropy(logits_at(model, x, at), target[scored], reduction="none")  # [N]
    return ce, at.nonzero()[:, 0]


@torch.no_grad()
def example_loss(model: nn.Module, data: ExampleSet) -> float:
    """Token-weighted mean CE over every scored token of every example: *the* validation loss."""
    total, count = 0.0, 0
    with training_state(model, False):  # no dropout-like routing noise in the measurement
        for x, y in data.batches:
            if (y[:, 1:] != IGNORE).any():
                ce, _ = _scored_ce(model, x, y)
                total += float(ce.sum())
                count += len(ce)
    return total / max(count, 1)


@torch.no_grad()
def example_losses(model: nn.Module, data: ExampleSet,
                   before_batch: Callable[[list[int]], None] | None = None) -> torch.Tensor:
    """Mean CE of every example on its own, in the order the examples were given: [N].

    Batched (the whole ExampleSet in len(batches) forwards), so a caller that needs every example's
    loss under many settings of the model (the router's target search) pays one pass per setting.
    `before_batch(rows)` runs before each batch's forward (routed evaluation sets row j to example
    rows[j]'s own stack weights there: StacksOn.per_row)."""
    n = sum(len(r) for r in data.rows)
    out = torch.full((n,), float("nan"))
    with training_state(model, False):
        for (x, y), rows in zip(data.batches, data.rows):
            if before_batch is not None:
                before_batch(rows)
            ce, row = _scored_ce(model, x, y)  # [N], [N]
            sums = torch.zeros(len(x)).index_add_(0, row, ce)
            scored = torch.bincount(row, minlength=len(x)).clamp(min=1)
            out[torch.tensor(rows)] = sums / scored
    return out


def per_example_losses(model: nn.Module, tok: Tokenizer, examples: Sequence[Example], completion_only: bool,
                       max_len: int) -> list[float]:
    """Mean CE of each example on its own (same scoring as `example_loss`), in the order given."""
    return example_losses(model, ExampleSet(tok, examples, completion_only, max_len)).tolist()
