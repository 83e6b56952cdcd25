"""Would greedy decoding give the reference answer? Checked for hundreds of examples in one pass each.

Generating an answer token by token is the slow part of an evaluation: a 60-token reasoning trace is
60 forwards, and a routed answer cannot share a batch with another prompt's route. For an example
with a reference response r_1 … r_n (r_n = <eos>), greedy decoding reproduces it exactly iff at every
step t the argmax of the next-token logits after prompt + r_<t is r_t — and the logits after the
*reference* prefix are exactly what one teacher-forced forward over prompt + response computes, at
every position at once:

    ids      <bos> p_1 … p_m  r_1 … r_{n-1}            one forward, causal: position i sees only ids ≤ i
    logits        ℓ_m  ℓ_{m+1} … ℓ_{m+n-1}              ℓ at the last prompt token predicts r_1, …
    greedy reproduces r  ⇔  argmax penalised(ℓ_{m+t-1}) == r_t  for every t = 1 … n

with the repetition penalty applied as `Transformer.generate` applies it (CTRL, as in Hugging Face):
a token already in the sequence — the prompt with its <bos>, and r_<t — has its logit divided by p if
positive, multiplied by p if negative. While every earlier argmax matched, the sequence generation
would have seen *is* prompt + r_<t, so the equivalence is exact, not an approximation; after the first
mismatch generation goes elsewhere and the answer is not the reference's. So the verdict is "greedy
decoding, as `generate` runs it, outputs exactly the reference response and stops", a stricter test
than the domain's answer check (a different but correct working counts as wrong) and a lower bound on
it, at the cost of one batched forward instead of n. Two caveats, both small: the batched forward and
generation's KV-cache forward round differently in fp32, which can only matter where two logits tie
to rounding; and the same text spelled in other tokens (BPE admits several) counts as different.

An example whose prompt + response does not fit the model's context gets `None`: generation would be
cut by the context, not decided by the model (stages/evaluate.py leaves such prompts out of n too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from ..data import Example
from ..lm.tokenizer import Tokenizer
from ..runtime import training_state
from ..training.examples import logits_at

BATCH_SIZE = 16  # examples per forward where they share one setting of the stacks


def penalised(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The repetition penalty of `Transformer.generate` on a block of positions at once.

    logits [R, V]; seen [R, V] bool, True where the token is already in the sequence at that position."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def reproduces(logits: torch.Tensor, prompt: list[int], response: list[int], penalty: float) -> bool:
    """Does greedy decoding output `response` after `prompt`, given the forward's logits at the positions
    that predict each response token? logits [R, V] with R = len(response), row t predicting response[t]."""
    R, V = logits.shape
    target = torch.tensor(response)
    # seen[t]: the prompt's tokens, and the response's tokens before position t (earlier = cumsum - own)
    onehot = torch.zeros(R, V)
    onehot[torch.arange(R), target] = 1.0
    seen = (onehot.cumsum(0) - onehot) > 0  # [R, V]
    seen[:, torch.tensor(prompt)] = True
    return bool((penalised(logits, seen, penalty).argmax(-1) == target).all())


@torch.no_grad()
def greedy_matches(model: nn.Module, tok: Tokenizer, examples: Sequence[Example], repetition_penalty: float,
                   batch_size: int = BATCH_SIZE, before_batch: Callable[[list[int]], None] | None = None) -> list[bool | None]:
    """For every example: True if greedy decoding reproduces its response and stops, False if not, None if
    prompt + response does not fit the context. In the order given.

    Batched by length and right-padded (causal attention: padding after a position never reaches it).
    `before_batch(rows)` runs before each batch's forward, with the positions of its examples in
    `examples` (the routed evaluation sets row j to example rows[j]'s own stack weights there: StacksOn.per_row)."""
    max_len = model.cfg.max_seq_len
    pairs = [(tok.encode(ex.prompt(), bos=True), tok.encode(ex.response, eos=True)) for ex in examples]
    out: list[bool | None] = [None] * len(pairs)
    # the forward reads prompt + every response token but the last (nothing comes after <eos>)
    fit = [i for i, (p, r) in enumerate(pairs) if len(p) + len(r) - 1 <= max_len]
    fit.sort(key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))  # little padding per batch
    with training_state(model, False):
        for b in range(0, len(fit), batch_size):
            rows = fit[b : b + batch_size]
            seqs = [pairs[i][0] + pairs[i][1][:-1] for i in rows]
            x = torch.full((len(rows), max(map(len, seqs))), tok.pad_id)
            for j, s in enumerate(seqs):
                x[j, : len(s)] = torch.tensor(s)
            if before_batch is not None:
                before_batch(rows)
            # the positions that predict a response token: from the last prompt token on
            at = torch.zeros(x.shape, dtype=torch.bool)
            for j, i in enumerate(rows):
                start = len(pairs[i][0]) - 1
                at[j, start : start + len(pairs[i][1])] = True
            logits = logits_at(model, x, at).float()  # [N, V], row by row
            for i, rows_logits in zip(rows, logits.split([len(pairs[i][1]) for i in rows])):
                prompt, response = pairs[i]
                out[i] = reproduces(rows_logits, prompt, response, repetition_penalty)
    return out
