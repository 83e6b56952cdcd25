"""Tests for ministacks/quant.py: NF4 by hand against bitsandbytes (parity), and the invariants of a
frozen 4-bit base (error bound, exact block maxima, memory, no trainable weights, gradient to the input).

bitsandbytes (0.50.2) runs on the CPU here. Its `dequantize_4bit` falls back to a torch.compile'd
function when the last dimension is odd (~17 s the first time), so every shape below has an even last
dimension; shapes whose size is not a multiple of 64 are still covered (a short last block)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the network
os.environ["HF_DATASETS_OFFLINE"] = "1"

import bitsandbytes as bnb
import bitsandbytes.functional as BF
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ministacks.bench.nf4 import bench_nf4, format_bench_nf4
from ministacks.lm.model import ModelConfig, Transformer
from ministacks.lm.quant import (
    DYNAMIC_CODE,
    NF4_CODE,
    NF4Linear,
    NF4Weight,
    TARGET_MODULES,
    dequantize_nf4,
    model_nbytes,
    nf4_code_from_normal,
    quantize_model,
    quantize_nf4,
)

TINY = dict(vocab_size=97, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=64)


def weights(*shape, seed=0, std=0.05):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


# ------------------------------------------------------------------------------------- code books


def test_nf4_code_book_is_bitsandbytes_and_its_derivation():
    assert torch.equal(NF4_CODE, BF.get_4bit_type("nf4", device="cpu"))
    # the quantile construction of the docstring reproduces the stored constants bit for bit
    assert torch.equal(nf4_code_from_normal(), NF4_CODE)
    assert NF4_CODE[0] == -1.0 and NF4_CODE[7] == 0.0 and NF4_CODE[-1] == 1.0
    assert bool((NF4_CODE[1:] > NF4_CODE[:-1]).all())  # sorted: the midpoint search relies on it
    assert int((NF4_CODE < 0).sum()) == 7 and int((NF4_CODE > 0).sum()) == 8  # the asymmetric halves


def test_dynamic_8bit_code_is_bitsandbytes():
    assert torch.equal(DYNAMIC_CODE, BF.create_dynamic_map())
    assert DYNAMIC_CODE.unique().numel() == 256


def test_packing_by_hand():
    # 1 -> code 15, -1 -> 0, 0 -> 7, 0.5 -> 12 (0.5 lies below the midpoint (0.4407 + 0.5626) / 2 = 0.5017)
    q = quantize_nf4(torch.tensor([1.0, -1.0, 0.0, 0.5]), blocksize=4)
    assert q.packed.tolist() == [0xF0, 0x7C]  # the first value of each pair in the high nibble
    assert q.absmax.tolist() == [1.0]
    # 5 values: the last byte is padded with the zero code 7
    q5 = quantize_nf4(torch.tensor([1.0, -1.0, 0.0, 0.5, 1.0]), blocksize=8)
    assert q5.packed.tolist() == [0xF0, 0x7C, 0xF7]


# ----------------------------------------------------------------------------- parity: bitsandbytes


@pytest.mark.parametrize("shape, blocksize", [
    ((256, 192), 64),
    ((3, 50), 64),  # 150 values: two full blocks and a short one of 22
    ((100,), 64),  # 1-D
    ((704, 256), 128),  # a down/up projection of the quick model, other block size
])
def test_quantize_dequantize_match_bitsandbytes_exactly(shape, blocksize):
    w = weights(*shape)
    packed, state = BF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    q = quantize_nf4(w, blocksize)
    assert torch.equal(q.packed, packed.view(-1))  # same bytes: same blocks, rounding and nibble order
    assert torch.equal(q.absmax, state.absmax)
    ours = dequantize_nf4(q)
    theirs = BF.dequantize_4bit(packed, state)
    assert ours.shape == w.shape and ours.dtype == torch.float32
    # exact: both compute fp32(NF4[code] * absmax), one multiply. (bitsandbytes returns 1-D as [1, n].)
    assert torch.equal(ours, theirs.reshape(shape))


def test_double_quant_matches_bitsandbytes():
    w = weights(704, 256)  # 2816 blocks -> 11 blocks of 256 scales
    packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = quantize_nf4(w, 64, double_quant=True)
    assert torch.equal(q.packed, packed.view(-1))
    assert torch.equal(q.absmax_offset, state.offset)  # the mean of the fp32 scales
    assert torch.equal(q.absmax_scale, state.state2.absmax)  # the scales' own absmax per 256
    # Our 8-bit codes are bitsandbytes' reference (pure torch, "default") kernel's, exactly ...
    _, plain = BF.quantize_4bit(w, blocksize=64, quant_type="nf4")  # the fp32 scales
    reference_kernel = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    ref_codes, _ = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
        reference_kernel, plain.absmax - state.offset, BF.create_dynamic_map(), 256)
    assert torch.equal(q.absmax, ref_codes)
    # ... but bitsandbytes' CPU C kernel (used by quantize_4bit on the CPU) picks a different code
    # for a few scales: its table search is approximate.
    n_diff = int((q.absmax != state.absmax).sum())
    assert 0 < n_diff < 0.01 * q.absmax.numel()
    # Given the same 8-bit codes, the dequantized weights are identical ...
    with_their_codes = NF4Weight(q.packed, state.absmax, q.shape, q.dtype, 64, q.absmax_scale, q.absmax_offset)
    theirs = BF.dequantize_4bit(packed, state)
    assert torch.equal(dequantize_nf4(with_their_codes), theirs)
    # ... and with ours they differ by at most one step of the 8-bit code (its widest, 0.9/64, times the
    # scales' largest 256-block absmax): |NF4 value| <= 1, so a weight moves no more than its scale
    ours = dequantize_nf4(q)
    one_step = DYNAMIC_CODE.diff().max() * q.absmax_scale.max()
    assert 0 < (ours - theirs).abs().max() <= one_step * (1 + 1e-5)  # + fp32 round-off
    # our scales are the nearest 8-bit codes: never further from the true scale than theirs
    true_scales = quantize_nf4(w, 64).absmax
    assert bool(((q.block_scales() - true_scales).abs()
                 <= (with_their_codes.block_scales() - true_scales).abs() + 1e-9).all())


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4linear_matches_bitsandbytes_linear4bit(double_quant):
    torch.manual_seed(0)
    lin = nn.Linear(256, 128, bias=True)
    ours = NF4Linear.from_linear(lin, double_quant=double_quant)
    theirs = bnb.nn.Linear4bit(256, 128, bias=True, compute_dtype=torch.float32,
                               compress_statistics=double_quant, quant_type="nf4")
    theirs.load_state_dict(lin.state_dict())
    theirs = theirs.to("cpu")  # Params4bit quantizes on its first .to(device), even to the CPU it is on
    assert theirs.weight.bnb_quantized and theirs.weight.dtype == torch.uint8
    x = torch.randn(4, 8, 256)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = ours(x1), theirs(x2)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    if double_quant:  # the 8-bit scale codes differ slightly (see test_double_quant_matches_bitsandbytes)
        torch.testing.assert_close(y1, y2, rtol=0, atol=1e-3 * y2.abs().max().item())
        torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-3 * x2.grad.abs().max().item())
    else:  # same dequantized weight, same F.linear: identical
        assert torch.equal(y1, y2) and torch.equal(x1.grad, x2.grad)


# ------------------------------------------------------------------------------------ invariants


def test_error_bound_and_exact_block_maxima():
    # heavy tails (Student t, 3 dof) and an all-zero block, in a size that leaves a short last block
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64 * 50 + 30,)) * 0.02
    w[64:128] = 0.0
    q = quantize_nf4(w, 64)
    w_hat = dequantize_nf4(q)
    n_blocks = q.absmax.numel()
    block = torch.arange(w.numel()) // 64
    scale = q.absmax[block]  # [n]
    # each value lies between the two midpoints around its code: at most half the gap to a neighbour
    codes = packed_codes(q.packed)[: w.numel()]  # [n]
    gap_down = torch.cat([torch.zeros(1), NF4_CODE.diff()])[codes.long()] / 2
    gap_up = torch.cat([NF4_CODE.diff(), torch.zeros(1)])[codes.long()] / 2
    err = w - w_hat  # positive: w above its code
    eps = 1e-6 * scale
    assert bool((err <= gap_up * scale + eps).all() and (-err <= gap_down * scale + eps).all())
    # overall: half the widest gap (between -1 and -0.696) times the block's absmax
    assert (err.abs() / scale.clamp(min=1e-38)).max() <= NF4_CODE.diff().max() / 2 + 1e-6
    # the largest |w| of every block is stored exactly (the code book ends in -1 and +1)
    for b in range(n_blocks):
        i = b * 64 + int(w[b * 64:(b + 1) * 64].abs().argmax())
        assert w_hat[i] == w[i]
    assert bool((w_hat[64:128] == 0).all()) and bool(torch.isfinite(w_hat).all())


def packed_codes(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes of a packed tensor in order, the obvious way: high nibble, then low nibble."""
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)


def test_memory_bits_per_weight():
    lin = nn.Linear(1024, 1024, bias=False)
    fp32_bytes = lin.weight.numel() * 4
    plain = NF4Linear.from_linear(lin).nf4_weight()
    double = NF4Linear.from_linear(lin, double_quant=True).nf4_weight()
    assert plain.bits_per_weight() == 4 + 32 / 64  # 4.5
    assert double.bits_per_weight() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / 1024**2, abs=1e-9)
    assert plain.nbytes() < fp32_bytes / 6 and double.nbytes() < plain.nbytes()
    # the module's state is exactly that: nothing else is stored
    layer = NF4Linear.from_linear(lin)
    assert sum(t.numel() * t.element_size() for t in layer.state_dict().values()) == plain.nbytes()


def test_nf4linear_forward_backward_and_frozen():
    torch.manual_seed(0)
    lin = nn.Linear(96, 160, bias=True)
    layer = NF4Linear.from_linear(lin)
    assert list(layer.parameters()) == []  # nothing to train, nothing for an optimizer to find
    w_hat = dequantize_nf4(quantize_nf4(lin.weight))
    x = torch.randn(2, 5, 96, requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, w_hat, lin.bias.detach())
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)  # same math, matmul order may differ
    assert all(not b.requires_grad for b in layer.buffers())
    # the cached variant computes the same thing
    cached = NF4Linear.from_linear(lin, cache_weight=True)
    assert torch.equal(cached(x.detach()), y.detach()) and cached.weight_cache is not None
    assert "4-bit" in repr(layer) and "in_features=96" in repr(layer)


def test_state_dict_roundtrips_through_safetensors(tmp_path):
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(64, 48, bias=True), double_quant=True)
    save_file(layer.state_dict(), tmp_path / "layer.safetensors")
    fresh = NF4Linear(64, 48, bias=True, double_quant=True)
    fresh.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), layer(x))
    assert set(layer.state_dict()) == {"packed", "absmax", "absmax_scale", "absmax_offset", "bias"}


def test_clear_errors():
    with pytest.raises(TypeError, match="floating-point"):
        quantize_nf4(torch.arange(64))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(64), blocksize=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_nf4(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.empty(0))
    with pytest.raises(TypeError, match="nn.Linear"):
        NF4Linear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)))


# ------------------------------------------------------------------------------------ whole model


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**TINY)).eval()


def test_quantize_model_replaces_exactly_the_projections():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    fp32_bytes = model_nbytes(model)
    fp32_weights = {n: m.weight.detach().clone() for n, m in model.named_modules()
                    if n.endswith(TARGET_MODULES)}
    quantize_model(model)
    replaced = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert len(replaced) == 7 * TINY["n_layer"]
    assert {n.rsplit(".", 1)[-1] for n in replaced} == set(TARGET_MODULES)
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] == ["lm_head"]
    assert isinstance(model.embed_tokens, nn.Embedding)
    assert model.lm_head.weight is model.embed_tokens.weight  # the tie survives
    assert model_nbytes(model) < fp32_bytes
    with torch.no_grad():
        logits = model(ids).logits
    # NF4 moves each Gaussian weight matrix by ~9% (relative L2); at this init the logits move by ~5%:
    # the error does not grow through the model (tied fp32 embeddings carry much of the signal)
    w_err = torch.stack([(model.get_submodule(n).dequantize_weight() - w).norm() / w.norm()
                         for n, w in fp32_weights.items()]).max().item()
    rel = ((logits - ref).norm() / ref.norm()).item()
    assert rel < w_err < 0.1, f"NF4 changed the logits by {rel:.1%}, the weights by up to {w_err:.1%}"
    out = model.generate(ids[:, :8], max_new_tokens=8)
    assert out.shape == (2, 16) and bool((out >= 0).all() and (out < 97).all())
    assert torch.equal(out, model.generate(ids[:, :8], max_new_tokens=8, use_cache=False))


def test_bench_nf4_reports_ratio_and_memory():
    r = bench_nf4(ModelConfig(**TINY), batch_size=2, seq_len=16, repeats=1)
    assert r["proj_ratio"] > 0 and r["model_ratio"] > 0
    assert r["bits_per_weight"] == 4.5 and r["proj_bytes_ratio"] < 1 / 6
    assert r["model_bytes"]["nf4"] < r["model_bytes"]["fp32"]
    assert "nf4/fp32" in format_bench_nf4(r)
