"""The KV cache of the decoding loop, and left padding: prompts of different lengths generated in one batch.

Left padding. Rows of a batch must end where generation starts, so a shorter prompt is padded on the left
with `pad[b]` filler tokens. Two things then keep row b computing exactly what it computes alone:

    positions   token t of row b sits at position t - pad[b] (RoPE reads positions: a prompt starts at 0)
    attention   no query reads a filler key: key j is visible to the query at i iff j <= i and j >= pad[b]

A filler query itself would then see no key at all (a softmax over nothing is nan), so it is let see its
own key; its output is never read by a real token, since no real query attends to filler positions.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for positions [0, length), preallocated up to `max_len`.

    k, v: [n_layer, B, n_kv_head, max_len, head_dim]. A forward pass with T new tokens writes
    positions [length, length+T) in every layer (`update`), then the model calls `advance(T)`.
    Writing into a preallocated buffer instead of `torch.cat`-ing avoids a copy per token.
    `pad` [B]: each row's left padding (None: no row is padded); every forward through the cache honours it.
    `cfg`: the model's ModelConfig (lm/model.py, which imports this file).
    """

    def __init__(self, cfg, batch_size: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 pad: torch.Tensor | None = None):
        self.max_len = max_len or cfg.max_seq_len
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.pad = pad

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, n_kv, T, D] at the current position; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len={self.max_len}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def repeat_rows(self, rows: int) -> None:
        """A one-row cache becomes `rows` copies of it: several continuations of one prefix read its keys."""
        if self.k.shape[1] != 1:
            raise ValueError(f"repeat_rows copies a one-row cache, not one of {self.k.shape[1]} rows")
        self.k, self.v = self.k.repeat(1, rows, 1, 1, 1), self.v.repeat(1, rows, 1, 1, 1)


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token lists of any lengths -> (ids [B, T] padded on the left with pad_id, pad [B]: each row's filler count;
    None where every prompt has length T, so the model runs its plain path, as for one prompt)."""
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), pad_id)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
    pad = torch.tensor([T - len(p) for p in prompts])
    return ids, pad if bool(pad.any()) else None


def padded_positions(pad: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """[B, T]: the position of each new token (cache slots start .. start+T-1) in its row; 0 on filler."""
    slots = torch.arange(start, start + T, device=pad.device)
    return (slots[None, :] - pad[:, None]).clamp(min=0)


def padded_mask(pad: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """[B, 1, T, start+T] bool: which keys each new query of each row may read (causal, no filler but its own)."""
    query = torch.arange(start, start + T, device=pad.device)[:, None]  # [T, 1]
    key = torch.arange(start + T, device=pad.device)[None, :]  # [1, S]
    real = key[None] >= pad[:, None, None]  # [B, 1, S]
    return ((key <= query) & (real | (key == query)))[:, None]  # [B, 1, T, S]
