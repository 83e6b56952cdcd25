"""PSN v2's capability blocks (docs/brainstacks.md §8): per domain a small transformer whose 7 projections are
mixtures of experts, reading the embedding-level input and adding a correction to the frozen base's output.

    ids ──► embed_tokens (the base's, frozen) ──► e [B, T, d]
             │                                    │
             ▼                                    ▼
        base layers (frozen) ──► h [B, T, d]     block_d: n_layer decoder layers of width d, every one of
             │                                    q, k, v, o, gate, up, down an MoE projection, then RMSNorm
             │                                    and out_proj (zero at the start) ──► c_d [B, T, d]
             │                                    (c_d − (c_d V) Vᵀ: out of the earlier blocks' directions V)
             ▼
        norm(h + Σ_d w_d c_d) ──► lm_head (the base's) ──► logits

Decisions the paper leaves open, and ours:
- Where a block reads: the base's token embeddings, the "embedding-level input" (the block never sees the
  base's hidden states, so blocks of different domains depend on nothing but the tokens).
- Where it writes: into the base's residual stream after its last layer, before the final norm, so the
  correction is read by the base's own norm and LM head (the vocabulary the base already speaks).
- How it is scaled: w_d, the same switch the stacks have (1 when on, or the meta-router's weight; 0 off).
  out_proj starts at zero, so a fresh block is the identity: the model is the base until it trains.
- An MoE projection is a mixture of rank-r experts under the noisy top-k router of MoE-LoRA (adapters/
  moe_lora.py), with no dense weight beneath it: 4 experts x rank 16, top-2, as the stacks. Its B
  matrices start at zero too; they get gradient once out_proj has left zero, as a LoRA's B does.
- Size: 2 layers of the base's width (the paper: 6 layers, ~100M parameters each, on a larger base).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from ..adapters.moe_lora import MoELoRA
from ..lm.model import DecoderLayer, ModelConfig, RMSNorm

PROJECTIONS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))


@dataclass(frozen=True)
class BlockConfig:
    n_layer: int = 2  # decoder layers per block (paper: 6)
    n_experts: int = 4  # experts per projection, as the stacks' MoE-LoRA
    r: int = 16  # each expert's rank
    top_k: int = 2  # experts per token (noisy top-k routing)
    aux_weight: float = 0.01  # λ of the load-balance loss, as in stack training
    # training one block (train.py): as one stack round, with its own steps
    steps: int = 60
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 6
    eval_every: int = 20
    ns_k: int = 16  # directions each earlier block keeps out of a later one (capped at half of d_model in all)


class MoEProjection(nn.Module):
    """y = Σ_{e in top-k(x)} g_e(x) · B_e A_e x · scale: MoE-LoRA's delta with nothing beneath it.
    The load-balance loss of the last forward is kept on `last_aux` (summed by the block)."""

    def __init__(self, d_in: int, d_out: int, cfg: BlockConfig):
        super().__init__()
        self.moe = MoELoRA(d_in, d_out, n_experts=cfg.n_experts, r=cfg.r, top_k=cfg.top_k)
        self.last_aux: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.moe(x)
        self.last_aux = out.aux_loss
        return out.delta


class CapabilityBlock(nn.Module):
    """One domain's block (module docstring): e [B, T, d] -> the correction c [B, T, d]."""

    def __init__(self, base_cfg: ModelConfig, cfg: BlockConfig = BlockConfig()):
        super().__init__()
        model_cfg = replace(base_cfg, n_layer=cfg.n_layer)
        self.layers = nn.ModuleList(DecoderLayer(model_cfg, i) for i in range(cfg.n_layer))
        for layer in self.layers:  # every one of the 7 projections becomes a mixture of experts
            for part, names in PROJECTIONS:
                owner = getattr(layer, part)
                for name in names:
                    linear = getattr(owner, name)
                    setattr(owner, name, MoEProjection(linear.in_features, linear.out_features, cfg))
        self.norm = RMSNorm(base_cfg.d_model, base_cfg.norm_eps)
        self.out_proj = nn.Linear(base_cfg.d_model, base_cfg.d_model, bias=False)
        nn.init.zeros_(self.out_proj.weight)  # a fresh block adds nothing: the identity
        self.basis: torch.Tensor | None = None  # V [d, K]: earlier blocks' output directions, kept out of c

    def forward(self, e: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = e
        for layer in self.layers:
            x = layer(x, cos, sin)
        c = self.out_proj(self.norm(x))
        if self.basis is not None:
            V = self.basis.to(c.dtype)
            c = c - (c @ V) @ V.T  # null-space projection: nothing of c lies in the earlier blocks' directions
        return c

    def aux_loss(self) -> torch.Tensor:
        terms = [m.last_aux for m in self.modules() if isinstance(m, MoEProjection) and m.last_aux is not None]
        return torch.stack(terms).sum() if terms else torch.zeros(())
