"""A frozen base with capability blocks beside it (blocks.py's diagram): the model PSN v2 trains and routes.

`PSNModel(base)` freezes the base and holds one block per domain in `blocks`; `weights` says which run and
how strongly (domain -> w; a domain missing from it is off), the analogue of the stacks' StacksOn. It has
the interface the rest of ministacks reads a model through — `forward(ids, labels=, at=)` returning a
ModelOutput, `cfg.max_seq_len`, `logits_at_positions`, `generate` — so training/examples.py's losses and
the decoding loop work on it unchanged. Generation recomputes the whole sequence each step (no KV cache
through the blocks: they are small, and PSN answers few prompts).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..lm.decode import decode
from ..lm.model import ModelOutput, Transformer
from ..stacks.layer import StacksOn
from .blocks import BlockConfig, CapabilityBlock


class PSNModel(nn.Module):
    logits_at_positions = True

    def __init__(self, base: Transformer):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.cfg = base.cfg
        self.blocks = nn.ModuleDict()
        self.weights: dict[str, float] = {}

    def add_block(self, domain: str, cfg: BlockConfig = BlockConfig()) -> CapabilityBlock:
        """A fresh block for `domain` (the identity until trained), switched on at weight 1."""
        if domain in self.blocks:
            raise ValueError(f"{domain} has a block already")
        torch.manual_seed(len(self.blocks))  # each block its own seed: the number of blocks before it
        block = CapabilityBlock(self.cfg, cfg).to(self.base.embed_tokens.weight.device)
        self.blocks[domain] = block
        self.weights[domain] = 1.0
        return block

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                at: torch.Tensor | None = None) -> ModelOutput:
        base = self.base
        T = input_ids.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        cos, sin = base.rope_cos[:T], base.rope_sin[:T]
        e = base.embed_tokens(input_ids)  # [B, T, d]: what every block reads
        h = e
        for layer in base.layers:
            h = layer(h, cos, sin)
        for domain, block in self.blocks.items():
            w = self.weights.get(domain, 0.0)
            if w:
                h = h + w * block(e, cos, sin)  # the correction, into the stream before the final norm
        x = base.norm(h)
        if at is not None:
            return ModelOutput(base.lm_head(x[at]), None, None)
        logits = base.lm_head(x)
        loss = None
        if labels is not None:
            shifted = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts labels[t + 1]
            loss = F.cross_entropy(logits.flatten(0, 1), shifted.flatten(), ignore_index=-100)
        return ModelOutput(logits, loss, None)

    def aux_loss(self) -> torch.Tensor:
        """Σ of the switched-on blocks' load-balance losses from the last forward."""
        terms = [b.aux_loss() for d, b in self.blocks.items() if self.weights.get(d, 0.0)]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, repetition_penalty: float = 1.0, eos_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return decode(lambda step, seq: self(seq).logits[:, -1], input_ids, max_new_tokens, self.cfg.max_seq_len,
                      temperature=temperature, top_k=top_k, repetition_penalty=repetition_penalty, eos_id=eos_id,
                      generator=generator)


@contextmanager
def blocks_on(model: PSNModel, on: StacksOn) -> Iterator[PSNModel]:
    """The blocks switched as the stacks' StacksOn says (ungated: every block at 1; base only: none; weighted: those
    weights), the previous switches back afterwards: what the router's oracle runs every combination in."""
    before = dict(model.weights)
    model.weights = {d: on.weight_of(d) for d in model.blocks}
    try:
        yield model
    finally:
        model.weights = before
