"""LoRA: a trainable low-rank update beside a frozen linear layer (Hu et al. 2021; rsLoRA, Kalajdzievski 2023).

This file implements
  - `AdapterOutput`     : what every adapter returns, the delta and its auxiliary loss (a NamedTuple,
                          so a load-balance loss travels with the output instead of hiding on a module)
  - `LoRA`              : one low-rank delta, the "parameter-matched single LoRA" baseline of the paper
  - `lora_param_count`  : r * (d_in + d_out)

The frozen projection W stays as it is; the adapter adds a rank-r correction to its output:

    y = W x + Δ(x),     Δ(x) = s · B A x,     A ∈ R^{r×d_in},  B ∈ R^{d_out×r}

    s = lora_alpha / sqrt(r)   (rsLoRA, the Brainstacks default: docs/brainstacks.md §1, α = 16)
    s = lora_alpha / r         (original LoRA, `use_rslora=False`)

              x [.., d_in]
              │
      ┌───────┴────────┐
      ▼                ▼
  ┌────────┐    ┌─────────────┐
  │   W    │    │ A [r, d_in] │  Kaiming-uniform (nn.Linear's init)
  │ frozen │    └──────┬──────┘
  └───┬────┘           ▼  h [.., r], times s
      │         ┌─────────────┐
      │         │ B [d_out, r]│  zeros: a fresh adapter changes nothing
      │         └──────┬──────┘
      ▼                ▼
     W x       +     Δ(x)      =  y [.., d_out]

Why B starts at zero and A does not: with B = 0 the model is exactly the base model at step 0 (adding
an adapter is an identity), while a random A still gives B a non-zero gradient, dL/dB = s·(dL/dy)(Ax)^T.
Both zero would leave both gradients zero forever.

Why sqrt(r) (rsLoRA): Kalajdzievski (2023) shows that with the original 1/r the size of the update and
of its gradients shrinks as the rank grows, so a high rank learns no better than a low one; 1/sqrt(r)
is the scaling that keeps both of order one at every rank, so that rank 64 actually uses its capacity.

The wrapper that computes W x + Δ(x) lives elsewhere (`stacks/layer.py`); this module returns only Δ.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class AdapterOutput(NamedTuple):
    delta: torch.Tensor  # [..., d_out], to be added to the frozen layer's output
    aux_loss: torch.Tensor  # scalar (0-dim) load-balance loss; exactly 0 for a plain LoRA


def project_columns(B: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """B − V(VᵀB) for B [..., d_out, r] and orthonormal V [d_out, K]: B's columns without their V part.

    Since δ = B(s·Ax) is linear in B, projecting B projects every token's delta: δ(I − VVᵀ) = (B − VVᵀB)(s·Ax)."""
    return B - V @ (V.transpose(0, 1) @ B)  # [d_out, K] @ ([K, d_out] @ [..., d_out, r]) -> [..., d_out, r]


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = True) -> float:
    """s = lora_alpha / sqrt(r) (rsLoRA) or lora_alpha / r (plain LoRA)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoRA(nn.Module):
    """Δ(x) = s · B A x with peft's names: `lora_A` [r, d_in], `lora_B` [d_out, r], `r`, `lora_alpha`.

    The default r = 64 is the paper's parameter-matched baseline for a 4-expert rank-16 MoE-LoRA
    (4 · 16 = 64: the same FLOPs and, up to the router, the same parameters; paper Exp. 1).
    """

    def __init__(self, d_in: int, d_out: int, r: int = 64, lora_alpha: float = 16, use_rslora: bool = True):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got r={r}")
        self.d_in, self.d_out, self.r = d_in, d_out, r
        self.lora_alpha, self.use_rslora = lora_alpha, use_rslora
        self.scaling = lora_scaling(lora_alpha, r, use_rslora)
        self.lora_A = nn.Parameter(torch.empty(r, d_in))
        self.lora_B = nn.Parameter(torch.empty(d_out, r))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # a = sqrt(5) is nn.Linear's default: uniform(-1/sqrt(d_in), 1/sqrt(d_in))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor, out_basis: torch.Tensor | None = None) -> AdapterOutput:
        """`out_basis` V [d_out, K]: compute the delta with B − V(VᵀB), i.e. δ − (δV)Vᵀ (null-space projection,
        nullspace.py) at the cost of one small [d_out, r] product instead of one per token."""
        B = self.lora_B if out_basis is None else project_columns(self.lora_B, out_basis)
        # s is applied to the rank-r intermediate, not to the d_out-wide output: r multiplies per token
        # instead of d_out, and the product is the same
        h = F.linear(x, self.lora_A) * self.scaling  # [.., d_in] @ [d_in, r] -> [.., r]
        delta = F.linear(h, B)  # [.., r] @ [r, d_out] -> [.., d_out]
        return AdapterOutput(delta, x.new_zeros(()))

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, r={self.r}, lora_alpha={self.lora_alpha}, "
                f"use_rslora={self.use_rslora} (scaling={self.scaling:g})")


def lora_param_count(d_in: int, d_out: int, r: int) -> int:
    """Parameters of one LoRA: A (r x d_in) + B (d_out x r) = r * (d_in + d_out)."""
    return r * (d_in + d_out)
