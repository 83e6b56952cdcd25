"""QLoRA's 4-bit NormalFloat (NF4), written by hand: the frozen 4-bit base that the stacks sit on.

This file implements (Dettmers et al. 2023, "QLoRA", sections 3 and 4):
  - `NF4_CODE`        : the 16 NF4 values, exactly as bitsandbytes stores them
  - `quantize_nf4`    : fp weights -> `NF4Weight` (packed 4-bit codes + one scale per block of 64)
  - `dequantize_nf4`  : `NF4Weight` -> fp32 weights
  - double quantization of the block scales (8 bits, blocks of 256, mean-centred)
  - `NF4Linear`       : a frozen 4-bit `nn.Linear`; gradient flows to the input, never to the weight
  - `quantize_model`  : swap the seven projections of a model for `NF4Linear`s, in place
Whether a 4-bit base is faster or slower than fp32 on this CPU, and how much smaller, is measured by
ministacks/bench/nf4.py.

    W [d_out, d_in] fp32
      | flatten row-major, cut into blocks of 64 values
      v
    block b: a_b = max|w|                      one fp32 scale per block     (32/64 = 0.5 bit/weight)
             w / a_b in [-1, 1] -> index of the nearest NF4 value (4 bits)  (4 bits/weight)
             two indices per byte, element 2i in the high nibble
      |
      v   W_hat = a_b * NF4[index]   (dequantize: one table lookup and one multiply per weight)

The NF4 code book. Trained weights are close to zero-mean normal, so the best 4-bit code for them puts
its values at quantiles of N(0, 1): each of the bins then holds the same share of the weights (QLoRA
eq. 4). Plain quantiles of 16 equal bins have no exact 0, and zero (padding, pruned weights) must be
exact, so NF4 is built from two halves that share the value 0:

    positives:  Phi^-1(p) at 9 points p evenly spaced from delta down to 1/2; drop p = 1/2 -> 8 values
    negatives: -Phi^-1(p) at 8 points p evenly spaced from delta down to 1/2; drop p = 1/2 -> 7 values
    NF4 = sort(negatives + {0} + positives) / max                       (16 values, -1 ... 0 ... 1)

with delta = 1 - (1/(2*15) + 1/(2*16)) / 2 = 0.9677083 (the mean of the outermost quantile positions of
a 15- and a 16-value code: Phi^-1(1) is infinite, so the end points must sit inside (0, 1)). The code is
asymmetric (7 negative values, 8 positive), and its ends are exactly -1 and +1, so the value with the
largest magnitude in each block is stored exactly. `nf4_code_from_normal` computes the table this way;
a test checks that it reproduces the stored constants bit for bit.

Quantization (blockwise absmax, QLoRA eq. 1, 2), for block b of the flattened tensor:

    a_b = max_{i in b} |w_i|;    s_i = clamp(w_i * (1 / a_b), -1, 1);    q_i = argmin_k |s_i - NF4_k|
    w_hat_i = a_b * NF4[q_i]          error: |w_i - w_hat_i| <= a_b * (gap between neighbouring codes) / 2

The nearest code is found with the 15 midpoints between neighbouring codes (`torch.bucketize`); a value
exactly on a midpoint goes to the lower code, as in bitsandbytes.

Double quantization (QLoRA section 3, "Double Quantization"): the n/64 fp32 scales cost 0.5 bit per
weight. All scales are positive, so they are first centred by their mean m, then quantized themselves,
8-bit blockwise in blocks of 256 with bitsandbytes' signed "dynamic" 8-bit code (`dynamic_code_8bit`):

    a_b = m + c_{b // 256} * DYN[r_b]      r_b: 8 bits per block; c: one fp32 per 256 blocks; m: one fp32
    bits per weight = 4 + 8/64 + 32/(64*256) = 4.127        (vs 4 + 32/64 = 4.5 without)

Training through a frozen 4-bit layer (QLoRA eq. 5; bitsandbytes' `MatMul4Bit`):

    forward:   y = x W_hat^T + b                  W_hat = dequantize(W_nf4), built on the fly
    backward:  dL/dx = dL/dy W_hat                W_hat built again; it is never stored between the two
               dL/dW: none (frozen: the 4-bit codes cannot be trained, and nothing asks for it)

Rebuilding W_hat in the backward is the point of the 4-bit base: plain autograd would save each
layer's fp32 W_hat for the backward, and at the peak of a training step the whole fp32 base would
be in memory again. Each step therefore costs two dequantizations per layer (bench/nf4.py
times them).

Layout conventions (those of bitsandbytes 0.50.2; `tests/test_quant.py` checks our bytes and values
against its `quantize_4bit` / `dequantize_4bit` / `Linear4bit` on the CPU):
  - blocks run over the row-major flattened tensor, so a block may span two rows; a last, shorter
    block gets its own absmax (no error for sizes that are not a multiple of the block size);
  - an odd number of values is padded with one 0 (code 7) to fill the last byte;
  - the stored 8-bit scale codes are the exact nearest codes, as in bitsandbytes' reference (pure torch)
    kernel. Its CPU C kernel finds the code with an approximate table search that misses the nearest
    code for ~0.2% of the scales (by one step; by a few for values within ~1e-5 of 0), so with double
    quantization a few of our scales differ from what bitsandbytes computes on the CPU by one 8-bit
    step; the 4-bit codes and everything else are identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import PROJECTION_NAMES

DEFAULT_BLOCKSIZE = 64  # values per absmax block: QLoRA's choice for the weights (bitsandbytes' default)
ABSMAX_BLOCKSIZE = 256  # scales per 8-bit block in double quantization (QLoRA section 3)
NF4_DELTA = 0.9677083  # outermost quantile position = 1 - (1/30 + 1/32) / 2 (bitsandbytes' `offset`)
TINY = 1e-38  # floor of a block's absmax before taking 1/absmax: an all-zero block gives 0, not NaN
# the projections that QLoRA (and the paper) quantize and wrap; HF Llama names (see model.py)
TARGET_MODULES = PROJECTION_NAMES

# The 16 NF4 values, copied from bitsandbytes (`functional.get_4bit_type("nf4")`), which hard-codes the
# output of its `create_normal_map(0.9677083)`. Stored, not recomputed at import, so dequantized values
# match bitsandbytes' bit for bit whatever the local inverse-normal-CDF implementation rounds to.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)  # [16], sorted; index 7 is the exact zero
NF4_ZERO = 7  # index of 0.0 in NF4_CODE: the code of padding

# A byte holds two codes, the first value of the pair in the high nibble. Row b of this table is the
# pair of values byte b stands for, so dequantizing is a single lookup per byte.
NF4_PAIRS = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)  # [256, 2]


def nf4_code_from_normal(delta: float = NF4_DELTA) -> torch.Tensor:
    """Derive the NF4 table from quantiles of N(0, 1) (see the module docstring), step for step as
    bitsandbytes' `create_normal_map`: fp32 quantile positions, fp64 inverse CDF, fp32 normalisation."""
    positives = torch.special.ndtri(torch.linspace(delta, 0.5, 9)[:-1].double())  # [8]
    negatives = -torch.special.ndtri(torch.linspace(delta, 0.5, 8)[:-1].double())  # [7]
    values = torch.cat([negatives, torch.zeros(1, dtype=torch.float64), positives]).float().sort().values
    return values / values.max()  # [16]


def dynamic_code_8bit() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (`create_dynamic_map()`; Dettmers 2016), used for the
    double-quantized scales: 0, 1, and for e = 0..6 the 2^e midpoints of an even grid on [0.1, 1],
    times 10^(e-6), with both signs: dense near 0, each decade with twice the values of the one below."""
    values = []
    for e in range(7):
        grid = torch.linspace(0.1, 1.0, 2**e + 1)  # fp32, as bitsandbytes computes it
        mids = (grid[:-1] + grid[1:]) / 2 * 10.0 ** (e - 6)  # [2^e]
        values += [mids, -mids]
    return torch.cat(values + [torch.tensor([0.0, 1.0])]).sort().values  # [256] = 2*(2^7 - 1) + 2


DYNAMIC_CODE = dynamic_code_8bit()  # [256]


# ------------------------------------------------------------------------------ blockwise quantization


def _quantize_blockwise(flat: torch.Tensor, code: torch.Tensor,
                        blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flat [n] fp32 -> (indices [n] uint8 of the nearest `code` value to w / absmax, absmax [n_blocks] fp32).
    One function for both codes: NF4 (16 values) for the weights, the 8-bit code for the scales."""
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    rem = n % blocksize
    blocks = F.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)  # zeros change no absmax
    absmax = blocks.abs().amax(dim=1)  # [n_blocks]
    scaled = blocks * (1.0 / absmax.clamp(min=TINY))[:, None]  # [n_blocks, blocksize]
    if rem:
        # bitsandbytes divides in the short last block instead of multiplying by 1/absmax; the two can
        # differ in the last bit, enough to move a value that sits on a midpoint. Mirror it.
        absmax[-1] = absmax[-1].clamp(min=TINY)
        scaled[-1, :rem] = flat[n - rem:] / absmax[-1]
    scaled = scaled.clamp(-1.0, 1.0)  # 1/absmax is rounded: |w| * (1/absmax) can exceed 1 by an ulp
    midpoints = (code[:-1] + code[1:]) / 2  # [len(code) - 1]; the code is sorted
    indices = torch.bucketize(scaled, midpoints)  # number of midpoints strictly below s: ties go down
    return indices.to(torch.uint8).view(-1)[:n], absmax


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values [n] in [-1, 1] -> values * absmax of their block, [n] fp32."""
    n = values.numel()
    if n % blocksize:
        values = F.pad(values, (0, blocksize - n % blocksize))
    return (values.view(-1, blocksize) * absmax[:, None]).view(-1)[:n]


@dataclass
class NF4Weight:
    """A tensor in NF4: what `quantize_nf4` returns and `dequantize_nf4` reads."""

    packed: torch.Tensor  # [ceil(n/2)] uint8: two 4-bit codes a byte, value 2i in the high nibble
    absmax: torch.Tensor  # [n_blocks] fp32 block scales; with double quantization their uint8 codes
    shape: tuple[int, ...]  # the original shape
    dtype: torch.dtype  # the original dtype (dequantize_nf4 returns fp32: we compute in fp32)
    blocksize: int = DEFAULT_BLOCKSIZE  # values per absmax block
    absmax_scale: torch.Tensor | None = None  # double quant: [ceil(n_blocks/256)] fp32, one per 256 scales
    absmax_offset: torch.Tensor | None = None  # double quant: [] fp32, the mean subtracted from the scales

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def block_scales(self) -> torch.Tensor:
        """The fp32 absmax of every block, [n_blocks]: stored as is, or rebuilt from 8 bits."""
        if not self.double_quant:
            return self.absmax
        centred = _scale_blocks(DYNAMIC_CODE.to(self.absmax.device)[self.absmax.long()],
                                self.absmax_scale, ABSMAX_BLOCKSIZE)  # [n_blocks]
        return centred + self.absmax_offset

    def nbytes(self) -> int:
        """Bytes of storage: codes + scales (+ the scales' scales and offset)."""
        parts = [self.packed, self.absmax, self.absmax_scale, self.absmax_offset]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def bits_per_weight(self) -> float:
        return 8 * self.nbytes() / self.numel


def _check_quantizable(w: torch.Tensor, blocksize: int) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize_nf4 expects a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"quantize_nf4 expects floating-point weights (fp32/bf16/fp16), got {w.dtype}; "
                        "integer tensors are already quantized or are not weights")
    if w.numel() == 0:
        raise ValueError("quantize_nf4 got an empty tensor: there is nothing to quantize")
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive int (QLoRA uses {DEFAULT_BLOCKSIZE}), "
                         f"got {blocksize!r}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_nf4 got weights containing NaN or inf: one inf would become the absmax of "
                         "its block and round every other value of the block to 0; fix the weights first")


@torch.no_grad()
def quantize_nf4(w: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = False) -> NF4Weight:
    """w (any shape, floating point) -> NF4Weight. See the module docstring for the math and layout."""
    _check_quantizable(w, blocksize)
    flat = w.detach().reshape(-1).float()  # [n]; blocks run over the row-major order
    codes, absmax = _quantize_blockwise(flat, NF4_CODE.to(flat.device), blocksize)  # [n], [n_blocks]
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), NF4_ZERO)])
    packed = (codes[0::2] << 4) | codes[1::2]  # [ceil(n/2)] uint8, first value of a pair in the high nibble
    q = NF4Weight(packed, absmax, tuple(w.shape), w.dtype, blocksize)
    if double_quant:
        # The scales are all positive; centring them lets the signed 8-bit code use both halves.
        q.absmax_offset = absmax.mean()
        q.absmax, q.absmax_scale = _quantize_blockwise(absmax - q.absmax_offset,
                                                       DYNAMIC_CODE.to(flat.device), ABSMAX_BLOCKSIZE)
    return q


def dequantize_nf4(q: NF4Weight) -> torch.Tensor:
    """NF4Weight -> fp32 tensor of the original shape: w_hat_i = absmax_{block(i)} * NF4[code_i]."""
    # Few, large ops on purpose: on a busy 2-core CPU each parallel torch op pays a thread-sync cost.
    pairs = NF4_PAIRS.to(q.packed.device).index_select(0, q.packed.long())  # [ceil(n/2), 2]
    values = pairs.view(-1)[: q.numel]  # [n] in [-1, 1]
    return _scale_blocks(values, q.block_scales(), q.blocksize).view(q.shape)


# ------------------------------------------------------------------------------------ the 4-bit layer


class _FrozenDequantLinear(torch.autograd.Function):
    """y = x W^T + b with W = dequantize() rebuilt in the backward instead of saved (bitsandbytes'
    MatMul4Bit): only the 4-bit codes stay in memory between forward and backward."""

    @staticmethod
    def forward(ctx, x, dequantize, bias):
        ctx.dequantize = dequantize
        return F.linear(x, dequantize(), bias)  # [..., d_out]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        grad_x = grad_y @ ctx.dequantize()  # [..., d_out] @ [d_out, d_in] -> [..., d_in]
        return grad_x, None, None  # no gradient for the weight, the callable, or the frozen bias


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4. Everything is a buffer (nothing to train, and `state_dict`
    saves with safetensors); the forward dequantizes and computes in fp32.

    `cache_weight=True` keeps the dequantized fp32 weight after the first forward: no per-step
    dequantization, but the layer then holds fp32 weights again (7x its 4-bit size), which is what the
    4-bit base is meant to avoid. Off by default."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = False, cache_weight: bool = False):
        super().__init__()
        if not isinstance(blocksize, int) or blocksize <= 0:
            raise ValueError(f"blocksize must be a positive int (QLoRA uses {DEFAULT_BLOCKSIZE}), "
                             f"got {blocksize!r}")
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant, self.cache_weight = blocksize, double_quant, cache_weight
        self.weight_dtype = torch.float32  # dtype of the weight that was quantized (set by from_linear)
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        # Zero buffers of the right sizes, so that a fresh layer can `load_state_dict` a saved one.
        self.register_buffer("packed", torch.zeros(-(-n // 2), dtype=torch.uint8))
        dq = double_quant
        self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.uint8 if dq else torch.float32))
        self.register_buffer("absmax_scale", torch.zeros(-(-n_blocks // ABSMAX_BLOCKSIZE)) if dq else None)
        self.register_buffer("absmax_offset", torch.zeros(()) if dq else None)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("weight_cache", None, persistent=False)  # fp32 W_hat, only with cache_weight

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = False,
                    cache_weight: bool = False) -> "NF4Linear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        q = quantize_nf4(linear.weight, blocksize, double_quant)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, blocksize, double_quant,
                    cache_weight).to(linear.weight.device)
        layer.weight_dtype = linear.weight.dtype
        layer.packed.copy_(q.packed)
        layer.absmax.copy_(q.absmax)
        if double_quant:
            layer.absmax_scale.copy_(q.absmax_scale)
            layer.absmax_offset.copy_(q.absmax_offset)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().float())
        return layer

    def nf4_weight(self) -> NF4Weight:
        return NF4Weight(self.packed, self.absmax, (self.out_features, self.in_features), self.weight_dtype,
                         self.blocksize, self.absmax_scale, self.absmax_offset)

    def dequantize_weight(self) -> torch.Tensor:
        """The fp32 weight W_hat [d_out, d_in] this layer computes with."""
        return dequantize_nf4(self.nf4_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # fp32 compute (bf16 on this CPU is ~38x slower)
        if self.cache_weight:
            if self.weight_cache is None:
                self.weight_cache = self.dequantize_weight()
            y = F.linear(xf, self.weight_cache, self.bias)
        else:
            y = _FrozenDequantLinear.apply(xf, self.dequantize_weight, self.bias)
        return y.to(x.dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        self.weight_cache = None  # new codes: the cached fp32 weight is stale
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        bits = self.nf4_weight().bits_per_weight()
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, "
                f"nf4 4-bit, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"{bits:.3f} bits/weight")


# -------------------------------------------------------------------------------------- whole models


@torch.no_grad()
def quantize_model(model: nn.Module, target_modules=TARGET_MODULES, blocksize: int = DEFAULT_BLOCKSIZE,
                   double_quant: bool = False, cache_weight: bool = False) -> nn.Module:
    """Replace, in place, every nn.Linear whose name ends in one of `target_modules` (peft's rule: the
    last dotted component) by its NF4Linear; embeddings, norms and the LM head stay fp32, as in QLoRA.
    Returns the model."""
    targets = set(target_modules)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not found:
        raise ValueError(f"quantize_model found no nn.Linear named one of {sorted(targets)} in "
                         f"{type(model).__name__}; check target_modules (already quantized?)")
    for name, linear in found:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child,
                NF4Linear.from_linear(linear, blocksize, double_quant, cache_weight))
    return model


def model_nbytes(model: nn.Module) -> int:
    """Bytes held by a model's parameters and buffers, each tensor counted once (a tied embedding is one
    tensor under two names)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
