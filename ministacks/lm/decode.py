"""The decoding loop of every model here: the toy Transformer (lm/model.py) and scale/'s Hugging Face bases.

`next_token` chooses one token per row from the last logits: greedy at temperature 0, otherwise a draw
from softmax(logits / temperature) restricted to the top_k largest if given, after the CTRL repetition
penalty. `decode` calls a model's `next_logits` step by step until max_new_tokens or every row's eos.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def next_token(logits: torch.Tensor, seq: torch.Tensor, temperature: float, top_k: int | None,
               repetition_penalty: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V], seq [B, L] -> next token ids [B]."""
    if repetition_penalty != 1.0:
        # CTRL (Keskar et al. 2019) as in HF: make every token already in the sequence less likely,
        # dividing a positive logit by p and multiplying a negative one by p (p > 1 penalises).
        seen = logits.gather(1, seq)  # [B, L]
        seen = torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty)
        logits = logits.scatter(1, seq, seen)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def decode(next_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
           max_new_tokens: int, max_seq_len: int, *, temperature: float = 0.0, top_k: int | None = None,
           repetition_penalty: float = 1.0, eos_id: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """The decoding loop of every model here (Transformer.generate, and scale/'s Hugging Face bases):
    `next_logits(step_input, seq)` gives the next-token logits [B, V] — step_input the prompt at the first
    call and the last token after, for a model with a KV cache; seq everything so far, for one without —
    and the tokens are chosen by next_token. Stops when every row has produced eos_id."""
    B, T = input_ids.shape
    if T + max_new_tokens > max_seq_len:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_seq_len={max_seq_len}; shorten the prompt or generate less")
    seq = step_input = input_ids
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        nxt = next_token(next_logits(step_input, seq).float(), seq, temperature, top_k, repetition_penalty,
                         generator)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)  # a finished row is padded with eos
            done |= nxt == eos_id
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if eos_id is not None and bool(done.all()):
            break
        step_input = nxt[:, None]
    return seq
