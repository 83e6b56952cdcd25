"""How big a stack is against its base: the paper's proportions, kept on a smaller base.

One MoE-LoRA stack of the paper (4 experts × rank 16 on the 7 projections of every layer) is 53.6M
parameters: 4.9% of TinyLlama-1.1B, 2.3% of Gemma 3 12B (docs/brainstacks.md §9). On a laptop-sized
base the same 4 × r16 is a third of the model: ten frozen stacks would hold three times the base, a
routed forward would cost more than the base's own, and none of the paper's findings would be tested
in the setting it reports. The share of the base is what has to carry over, not the literal rank.

A stack's size against the base, for one projection of shape (d_in, d_out) in each of L layers:

    stack = L · Σ_proj [ N · r · (d_in + d_out)  +  2 · N · d_in ]      (experts' A and B; router and noise)
    base  ∝ L · d²  (+ the embedding)

so the share falls as r / d. `scaled_adapter` keeps the paper's 4 experts and top-2 and picks the rank
whose share is nearest TinyLlama's 4.9% (the paper's Exp 1–2 base, the closest in kind to ours); the
single-LoRA baseline gets the rank whose parameter count is nearest the MoE stack's, so Exp 1 stays
parameter-matched when the routers are a visible part of a small stack. The paper's literal
AdapterConfig() (4 × r16, LoRA r64) is one preset field away, and the parameter-count tests check it.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..lm.model import PROJECTION_NAMES, ModelConfig, Transformer
from .layer import AdapterConfig

# One stack's share of the paper's bases: 53.6M of TinyLlama-1.1B's 1.10B, 276.7M of Gemma 3 12B's ~12B
PAPER_STACK_SHARE = {"TinyLlama-1.1B": 0.049, "Gemma 3 12B": 0.023}


def projection_shapes(model_cfg: ModelConfig) -> tuple[int, list[tuple[int, int]]]:
    """(base parameters, (d_in, d_out) of every wrapped projection of every layer) for a model config.

    Read off the model itself, built on the CPU (~0.1 s; presets call this at import). Not on the meta
    device: building there pulls in torch._dynamo, a second added to every command's start."""
    with torch.random.fork_rng(devices=[]):  # the random init must not move the caller's RNG
        model = Transformer(model_cfg)
    shapes = [(m.in_features, m.out_features) for name, m in model.named_modules()
              if name.split(".")[-1] in PROJECTION_NAMES]
    return model.num_params(), shapes


def _count(shapes: list[tuple[int, int]], cfg: AdapterConfig, kind: str) -> int:
    """Parameters of one stack of `kind` on projections of these shapes (the formula above)."""
    if kind == "moe":
        return sum(cfg.n_experts * cfg.r * (i + o) + 2 * cfg.n_experts * i for i, o in shapes)
    if kind == "lora":
        return sum(cfg.lora_r * (i + o) for i, o in shapes)
    raise ValueError(f"unknown adapter kind {kind!r}: use 'moe' or 'lora'")


def stack_params(model_cfg: ModelConfig, cfg: AdapterConfig, kind: str = "moe") -> int:
    """Parameters of one stack of `kind` ("moe" or "lora") on a model of `model_cfg`."""
    return _count(projection_shapes(model_cfg)[1], cfg, kind)


def stack_share(model_cfg: ModelConfig, cfg: AdapterConfig) -> float:
    """One MoE-LoRA stack's parameters as a share of the base's."""
    base, shapes = projection_shapes(model_cfg)
    return _count(shapes, cfg, "moe") / base


def scaled_adapter(model_cfg: ModelConfig, share: float = PAPER_STACK_SHARE["TinyLlama-1.1B"],
                   cfg: AdapterConfig = AdapterConfig()) -> AdapterConfig:
    """`cfg` with the expert rank whose stack share of this base is nearest `share` (at least 1), and the
    single LoRA's rank set to match the MoE stack's parameter count as closely as a whole rank can."""
    base, shapes = projection_shapes(model_cfg)  # once: every candidate rank is counted on the same shapes
    r = min(range(1, cfg.r + 1), key=lambda r: abs(_count(shapes, replace(cfg, r=r), "moe") / base - share))
    moe = _count(shapes, replace(cfg, r=r), "moe")
    per_rank = _count(shapes, replace(cfg, lora_r=1), "lora")
    return replace(cfg, r=r, lora_r=max(1, round(moe / per_rank)))
