"""A LLaMA-style decoder, written from scratch, that the adapter stacks sit on.

This file implements
  - `ModelConfig`   : the architecture, one dataclass, saved as JSON beside every checkpoint
  - `RMSNorm`       : y = x / sqrt(mean(x^2) + eps) * w               (computed in fp32)
  - rotary position embeddings (RoPE), "rotate_half" convention of Hugging Face Llama
  - `Attention`     : causal grouped-query attention through `F.scaled_dot_product_attention`
  - `MLP`           : SwiGLU, y = down(silu(gate(x)) * up(x))
  - the KV cache (lm/cache.py): preallocated keys/values so decoding one token costs one token of compute,
                      and left padding, so prompts of different lengths generate in one batch
  - `Transformer`   : the decoder, its loss, `generate` (greedy / temperature / top-k / repetition
                      penalty / eos, through lm/decode.py) and a safetensors-friendly save/load of
                      tied embeddings

Each block is pre-norm:   h = x + attn(norm1(x));   out = h + mlp(norm2(h)).

Module names mirror Hugging Face `LlamaForCausalLM` exactly (`embed_tokens`, `layers[i].self_attn.q_proj`,
..., `mlp.down_proj`, `norm`, `lm_head`), so the same `target_modules` list selects the same
projections here and on a real pretrained Llama, and our state dict copies into HF's by name
(`tests/test_model.py` checks the logits agree). The seven projections are plain `nn.Linear`s and
are always *called* (`self.q_proj(x)`), never read through `.weight`, because the adapter code
swaps them for wrapper modules (MoE-LoRA stacks, 4-bit linears) that must see every input. The
projections that read one input (q, k, v; gate, up) are called through `project`, which lets such a
wrapper compute them together (stacks/layer.py's `joint_forward`: one pass of the frozen stacks
instead of one per projection, what generation pays for per token) and is a plain call otherwise.

Everything here runs in fp32: on a CPU without bf16 hardware, bf16 autocast is ~38x slower.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ministacks.lm.cache import KVCache, padded_mask, padded_positions
from ministacks.lm.decode import decode


# The seven projections of every layer, named as in Hugging Face Llama/Gemma: adapters (stacks/layer.py) and
# the 4-bit base (quant.py) target these names, on this model and on a Hugging Face one alike.
PROJECTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelConfig:
    vocab_size: int = 4096  # BPE vocabulary; 2-4K is the CPU sweet spot (the LM head dominates above)
    n_layer: int = 4  # decoder blocks
    d_model: int = 256  # residual stream width
    n_head: int = 4  # query heads; head_dim = d_model // n_head
    n_kv_head: int = 2  # key/value heads, shared by n_head // n_kv_head query heads each (GQA)
    d_ff: int = 0  # SwiGLU hidden size; 0 -> round_up(8/3 * d_model, 64), the LLaMA rule (see ff_dim)
    max_seq_len: int = 256  # longest sequence; the RoPE tables are precomputed up to here
    rope_theta: float = 10000.0  # RoPE base: pair i rotates by pos * theta^(-2i/head_dim)
    norm_eps: float = 1e-5  # RMSNorm epsilon (HF's rms_norm_eps)
    tie_embeddings: bool = True  # lm_head shares the embedding matrix (saves V*d params; GPT-2 style)
    init_std: float = 0.02  # std of the normal init of every matrix (GPT-2 / LLaMA value)

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        """The SwiGLU hidden size actually used. Resolved lazily (not in __post_init__) so that
        `dataclasses.replace(cfg, d_model=...)` recomputes it instead of keeping a stale value."""
        if self.d_ff > 0:
            return self.d_ff
        # 8/3 * d keeps the parameter count of a 4d GELU MLP with three matrices instead of two
        return 64 * math.ceil(8 * self.d_model / 3 / 64)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown ModelConfig field(s) {sorted(unknown)}; the config was written by another "
                f"version of ministacks. Known fields: {sorted(known)}"
            )
        return cls(**d)


class ModelOutput(NamedTuple):
    logits: torch.Tensor | None  # [B, T, V]; None when asked for hidden states only
    loss: torch.Tensor | None  # scalar mean next-token cross-entropy, or None without labels
    hidden_states: tuple[torch.Tensor, ...] | None  # n_layer+1 tensors [B, T, d], HF convention


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2, -1) + eps) * weight. Unlike LayerNorm there is no mean subtraction
    and no bias; the statistic is taken in fp32 so it stays accurate if x is ever half precision."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings (Su et al. 2021).
# Channel i (i < D/2) of a head is paired with channel i + D/2 ("rotate_half", as in HF Llama; the
# original paper pairs neighbours 2i, 2i+1 — the two differ by a fixed permutation of the q/k weight
# rows, so only the convention must match HF for the parity test). Pair i at position p is rotated
# by the angle p * theta^(-2i/D):
#     [x_i, x_{i+D/2}] -> [x_i cos a - x_{i+D/2} sin a,  x_{i+D/2} cos a + x_i sin a]
# Rotations compose, so <rope(q, m), rope(k, n)> depends only on m - n: attention sees relative position.


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape [max_seq_len, head_dim]; both halves repeat the D/2 angles."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # [D/2]
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # [S, D/2]
    angles = torch.cat([angles, angles], dim=-1)  # [S, D]
    # float64 for the angles: at large p*freq, fp32 rounding of the angle itself would be visible
    return angles.cos().float(), angles.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos, sin: [T, D] (already sliced to the positions of x), or [B, 1, T, D] per row."""
    return x * cos + rotate_half(x) * sin


def project(x: torch.Tensor, *projections: nn.Module) -> tuple[torch.Tensor, ...]:
    """(p(x) for p in projections), for projections that all read x.

    The first projection may offer `joint_forward(x, projections)`, which returns all the outputs from one
    pass or None where it cannot; duck-typed, so this file knows nothing of what wraps its projections."""
    joint = getattr(projections[0], "joint_forward", None)
    out = joint(x, projections) if joint is not None else None
    return tuple(p(x) for p in projections) if out is None else tuple(out)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of the KV cache is ours
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        d, kv_dim = cfg.d_model, cfg.n_kv_head * cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_dim, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` [B, 1, T, S]: the keys each query may read, where rows are left-padded (lm/cache.py)."""
        B, T, _ = x.shape  # H query heads, K kv heads, D head_dim
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, K, T, D]
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, K, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        start = 0
        if kv_cache is not None:
            start = kv_cache.length
            k, v = kv_cache.update(self.layer_idx, k, v)  # [B, K, start+T, D]
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        elif start == 0:
            # training, or prefilling an empty cache: square causal attention, no mask materialised
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif T == 1:
            # decoding one token: it may see every cached position, so no mask at all
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            # T > 1 new tokens after a non-empty cache: SDPA's is_causal aligns the triangle to the
            # top-left of a non-square matrix, which is wrong here, so build the bottom-right mask
            qpos = torch.arange(start, start + T, device=x.device)[:, None]  # [T, 1]
            mask = torch.arange(start + T, device=x.device)[None, :] <= qpos  # [T, start+T]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # [B, T, d]
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): the gate's SiLU decides, per hidden unit, how much of `up` passes."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ff_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv_cache=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # one Parameter, two names
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # non-persistent: derived from the config, so they stay out of checkpoints (as in HF)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, init_std) for every matrix; the two projections that write into the residual stream
        (o_proj, down_proj) get std / sqrt(2 * n_layer) so that the stream's variance does not grow
        with depth (2 residual additions per layer; GPT-2, Radford et al. 2019). RMSNorm weights = 1."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layer))
            elif p.dim() == 2:
                nn.init.normal_(p, mean=0.0, std=std)  # the tied matrix is visited once
            else:
                nn.init.ones_(p)

    def num_params(self, non_embedding: bool = False) -> int:
        """Distinct parameters (a tied matrix counts once). `non_embedding=True` leaves out the token
        embedding table; with tied embeddings that table is also the LM head (nanoGPT convention)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() already deduplicates ties
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
        return n

    # forward(..., at=mask) computes the logits at those positions only (training/examples.py's logits_at asks)
    logits_at_positions = True

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                output_hidden_states: bool = False, kv_cache: KVCache | None = None,
                return_logits: bool = True, at: torch.Tensor | None = None,
                pad: torch.Tensor | None = None) -> ModelOutput:
        """input_ids, labels: [B, T]. labels are aligned with input_ids (HF convention): position t
        predicts labels[t+1]; -100 marks positions that do not count. Returns logits [B, T, V]
        (None with `return_logits=False`, for callers that only want hidden states: the router's
        features skip the LM head, a quarter of a small model's forward). `at`, a bool mask [B, T]:
        the logits [N, V] at its N True positions in row-major order, and the LM head runs there only
        (a prompt's positions are not scored, and the head is the largest matmul of a small model).
        `pad` [B]: rows left-padded by that many filler tokens (lm/cache.py; a KV cache carries its own)."""
        if at is not None and labels is not None:
            raise ValueError("forward takes labels (the mean loss over all positions) or at (some positions' logits), not both")
        B, T = input_ids.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        pad = kv_cache.pad if kv_cache is not None else pad
        mask = None
        if pad is None:
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # [T, D]
        else:  # each row at its own positions, no query reading filler
            pos = padded_positions(pad, start, T)  # [B, T]
            cos, sin, mask = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None], padded_mask(pad, start, T)

        x = self.embed_tokens(input_ids)  # [B, T, d]
        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, cos, sin, kv_cache, mask)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x  # HF: the last entry is the final-normed state that feeds lm_head
        if kv_cache is not None:
            kv_cache.advance(T)
        if not return_logits and labels is None:
            return ModelOutput(None, None, tuple(hidden) if hidden is not None else None)
        if at is not None:
            return ModelOutput(self.lm_head(x[at]), None, tuple(hidden) if hidden is not None else None)  # [N, V]
        logits = self.lm_head(x)  # [B, T, V]

        loss = None
        if labels is not None:
            # Shift the labels left instead of slicing logits[:, :-1]: slicing would copy the largest
            # tensor of the step (B*T*V floats); the padded last column is ignored, so the mean is equal.
            shifted = F.pad(labels[:, 1:], (0, 1), value=-100)  # [B, T]
            loss = F.cross_entropy(logits.view(B * T, -1), shifted.reshape(B * T), ignore_index=-100)
        return ModelOutput(logits, loss, tuple(hidden) if hidden is not None else None)

    # ----------------------------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, repetition_penalty: float = 1.0, eos_id: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 pad: torch.Tensor | None = None) -> torch.Tensor:
        """Continue B prompts of equal length T: [B, T] -> [B, T + n], n <= max_new_tokens. Prompts of other
        lengths: left-padded to T, `pad` [B] the filler count of each row (lm/cache.py's `left_padded`).

        temperature 0 is greedy; otherwise sample from softmax(logits / temperature), restricted to
        the top_k largest logits if given. Generation stops when every row has produced `eos_id`
        (kept in the output); a row that finished earlier is padded with eos_id. `use_cache=False`
        recomputes the whole sequence at every step: slow, obviously correct, the test's reference.
        """
        B, T = input_ids.shape
        cache = None
        if use_cache:
            p = self.embed_tokens.weight
            cache = KVCache(self.cfg, B, T + max_new_tokens, dtype=p.dtype, device=p.device, pad=pad)

        def next_logits(step_input: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
            # with the cache: the prompt first (prefill), then one token at a time; without: the whole sequence
            return (self(step_input, kv_cache=cache) if use_cache else self(seq, pad=pad)).logits[:, -1]  # [B, V]

        return decode(next_logits, input_ids, max_new_tokens, self.cfg.max_seq_len, temperature=temperature,
                      top_k=top_k, repetition_penalty=repetition_penalty, eos_id=eos_id, generator=generator)

    # --------------------------------------------------------------------------- save / load

    def state_dict_for_save(self) -> dict[str, torch.Tensor]:
        """The state dict for `safetensors.torch.save_file`, which refuses two names for one tensor:
        with tied embeddings `lm_head.weight` is dropped (it *is* `embed_tokens.weight`)."""
        sd = self.state_dict()
        if self.cfg.tie_embeddings:
            sd.pop("lm_head.weight", None)
        return {k: v.contiguous() for k, v in sd.items()}

    def load_state_dict_from_save(self, sd: dict[str, torch.Tensor]) -> None:
        """Inverse of `state_dict_for_save`. Loading copies values in place into the existing
        Parameters, so the tie (one Parameter under two names) survives."""
        missing, unexpected = self.load_state_dict(sd, strict=False)
        allowed = {"lm_head.weight"} if self.cfg.tie_embeddings else set()
        bad_missing = set(missing) - allowed
        if bad_missing or unexpected:
            raise ValueError(f"checkpoint does not match this model: missing {sorted(bad_missing)}, "
                             f"unexpected {sorted(unexpected)}. Was it saved with another ModelConfig?")
        if self.cfg.tie_embeddings:
            assert self.lm_head.weight is self.embed_tokens.weight

