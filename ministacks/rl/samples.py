"""What RL trains on: DPO's preference pairs from the corpora, GRPO's groups sampled from the policy, and
the batches both are scored in.

DPO pairs (our choice; the paper publishes none). Chosen: the true reply of a training example.
Rejected: by default the true reply to *another* prompt of the same domain ("other") — fluent, on topic
for the domain, and wrong for this prompt, so the pair teaches what the prompt asks for rather than
what good text looks like; or the policy's own greedy reply at the start of RL ("sample"), when it is
not the true one — the pair then pushes the stack away from its own mistakes. Which other reply is a
seeded permutation of the examples (never the example itself, never an identical text).

GRPO groups: G completions of one prompt, sampled from the policy as it is (eval mode: no routing
noise, so the sampler and the learner are the same distribution) with the KV-cache generator
(lm/model.py's `generate`), `temperature` and `top_k` as configured, each up to the first eos; a
step's P groups are sampled together, P·G rows with the prompts left-padded (lm/cache.py).

Every sequence is `<bos> prompt completion`, right-padded: position t of the completion mask is True
where token t belongs to the completion (its eos included, so ending is learnt too). Right padding is
never read by an earlier position of a causal model, so a padded row scores exactly as it would alone.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn

from ..data.example import Example
from ..lm.cache import left_padded
from ..lm.tokenizer import Tokenizer
from ..runtime import training_state


class Scored(NamedTuple):
    ids: torch.Tensor  # [B, T] <bos> prompt completion, right-padded with pad_id
    completion: torch.Tensor  # [B, T] True at the completion's tokens


def batch_of(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> Scored:
    """(prompt ids, completion ids) pairs -> one right-padded batch and its completion mask."""
    T = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), T), pad_id)
    completion = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        completion[i, len(p) : len(p) + len(c)] = True
    return Scored(ids, completion)


def fits(tok: Tokenizer, ex: Example, room: int, max_len: int) -> bool:
    """Does the prompt leave `room` tokens of the context to answer in?"""
    return len(tok.encode(ex.prompt(), bos=True)) + room <= max_len


# -- DPO -------------------------------------------------------------------------------------------------

class Pair(NamedTuple):
    prompt: list[int]  # <bos> prompt
    chosen: list[int]  # the true reply, <eos> ended
    rejected: list[int]  # another reply, <eos> ended


def reply_pairs(tok: Tokenizer, examples: Sequence[Example], max_len: int, seed: int) -> list[Pair]:
    """Pairs of (true reply, a reply to another prompt of the domain), one per example that fits in
    max_len with either reply; the other reply is drawn by a seeded derangement (never itself, never
    an identical text)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    pairs = []
    for k, i in enumerate(order):
        ex = examples[i]
        # the next example in the shuffled order whose reply differs: a fixed, seeded choice of "other"
        other = next((examples[order[(k + j) % len(order)]] for j in range(1, len(order))
                      if examples[order[(k + j) % len(order)]].response != ex.response), None)
        if other is None:
            continue
        pair = Pair(tok.encode(ex.prompt(), bos=True), tok.encode(ex.response, eos=True),
                    tok.encode(other.response, eos=True))
        if len(pair.prompt) + max(len(pair.chosen), len(pair.rejected)) <= max_len:
            pairs.append(pair)
    return pairs


def sampled_pairs(model: nn.Module, tok: Tokenizer, examples: Sequence[Example], max_len: int,
                  max_new_tokens: int) -> list[Pair]:
    """Pairs of (true reply, the policy's own greedy reply) for the examples whose greedy reply is not the
    true one (a pair of equals teaches nothing)."""
    pairs = []
    for ex, reply in zip(examples, greedy_replies(model, tok, examples, max_new_tokens, max_len)):
        if reply.strip() == ex.response.strip():
            continue
        pair = Pair(tok.encode(ex.prompt(), bos=True), tok.encode(ex.response, eos=True), tok.encode(reply, eos=True))
        if len(pair.prompt) + max(len(pair.chosen), len(pair.rejected)) <= max_len:
            pairs.append(pair)
    return pairs


def pair_batch(pairs: Sequence[Pair], pad_id: int) -> Scored:
    """The chosen rows first, then the rejected: [2P, T]; rows i and P + i are pair i."""
    return batch_of([(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs], pad_id)


# -- GRPO ------------------------------------------------------------------------------------------------

def completion_ids(row: torch.Tensor, eos_id: int) -> list[int]:
    """A generated continuation up to and including its first eos (all of it if it never ended)."""
    ids = row.tolist()
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


class NonFinitePolicy(RuntimeError):
    """The policy's next-token distribution holds inf or nan: it cannot be sampled from (a blown-up stack)."""


@torch.no_grad()
def sample_groups(model: nn.Module, tok: Tokenizer, examples: Sequence[Example], group: int, max_new_tokens: int,
                  temperature: float, top_k: int | None, generator: torch.Generator
                  ) -> list[tuple[list[int], list[list[int]]]]:
    """G sampled completions of each prompt: [(prompt ids, [completion ids] * G)] in the examples' order.

    Every group in one batch of P·G rows, the prompts left-padded to the longest (lm/cache.py): one decoding
    loop where group by group there were P (at the quick preset, 3 groups of 8 on the demo's reasoning run:
    1.4 s against 2.1 s, measured in one run)."""
    prompts = [tok.encode(ex.prompt(), bos=True) for ex in examples]
    rows = [p for p in prompts for _ in range(group)]  # [P·G], a prompt's G rows together
    x, pad = left_padded(rows, tok.pad_id)
    budget = min(max_new_tokens, model.cfg.max_seq_len - x.shape[1])
    with training_state(model, False):  # the policy as it answers: no routing noise
        try:
            out = model.generate(x, budget, temperature=temperature, top_k=top_k, eos_id=tok.eos_id,
                                 generator=generator, pad=pad)
        except RuntimeError as e:
            if "probability tensor" not in str(e):  # torch.multinomial's complaint about inf / nan
                raise
            raise NonFinitePolicy(f"the policy's next-token probabilities are not finite ({e})") from None
    done = [completion_ids(row, tok.eos_id) for row in out[:, x.shape[1]:]]
    return [(p, done[i * group:(i + 1) * group]) for i, p in enumerate(prompts)]


def sample_group(model: nn.Module, tok: Tokenizer, ex: Example, group: int, max_new_tokens: int,
                 temperature: float, top_k: int | None, generator: torch.Generator) -> tuple[list[int], list[list[int]]]:
    """G sampled completions of one prompt: (prompt ids, [completion ids] * G)."""
    return sample_groups(model, tok, [ex], group, max_new_tokens, temperature, top_k, generator)[0]


def text_of(tok: Tokenizer, completion: list[int]) -> str:
    """The completion as text, its eos dropped (the rewards read text)."""
    return tok.decode([t for t in completion if t != tok.eos_id])


# -- greedy answers, batched -----------------------------------------------------------------------------

@torch.no_grad()
def greedy_replies(model: nn.Module, tok: Tokenizer, examples: Sequence[Example], max_new_tokens: int,
                   max_len: int, batch_size: int = 32) -> list[str]:
    """The greedy reply to every example (plain greedy, no repetition penalty: the policy's own most
    likely answer, the one RL moves), `batch_size` prompts at a time in order of length, left-padded
    (lm/cache.py), each batch answering in what its longest prompt leaves of `max_len` (at most
    max_new_tokens); a prompt that leaves no room gets "". (By length, the quick demo's 40 reasoning
    prompts took 8.9 s where prompts of one length were generated together, 2.5 s left-padded, with the
    same 40 replies: measured in one run.)"""
    prompts = [tok.encode(ex.prompt(), bos=True) for ex in examples]
    replies = [""] * len(examples)
    order = sorted((i for i, p in enumerate(prompts) if len(p) < max_len), key=lambda i: len(prompts[i]))
    with training_state(model, False):
        for b in range(0, len(order), batch_size):
            chunk = order[b : b + batch_size]
            ids, pad = left_padded([prompts[i] for i in chunk], tok.pad_id)
            budget = min(max_new_tokens, max_len - ids.shape[1])
            out = model.generate(ids, budget, eos_id=tok.eos_id, pad=pad)
            for i, row in zip(chunk, out[:, ids.shape[1]:]):
                replies[i] = text_of(tok, completion_ids(row, tok.eos_id))
    return replies
