"""MoE-LoRA and LoRA: routing invariants, the load-balance loss, identity at init, parameter counts
(the paper's numbers), and parity of the fast vectorised path with a slow per-token reference."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ministacks.bench.moe import NaiveMoELoRA
from ministacks.stacks.layer import add_stack, inject_stacks
from ministacks.adapters.lora import LoRA, lora_param_count
from ministacks.lm.model import ModelConfig, Transformer
from ministacks.adapters.moe_lora import (GEMMA3_12B_DIMS, GEMMA3_12B_N_LAYERS, TINYLLAMA_DIMS, TINYLLAMA_N_LAYERS,
                                 MoELoRA, llama_projection_dims, moe_lora_param_count, route,
                                 stack_param_count)

D_IN, D_OUT, E = 12, 10, 4


def trained_looking(m: MoELoRA, seed: int = 0) -> MoELoRA:
    """Give every parameter a non-trivial value (a fresh module has B = 0 and W_n = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=g))
        m.router.weight.copy_(torch.randn(m.router.weight.shape, generator=g))
        m.noise.weight.copy_(0.5 * torch.randn(m.noise.weight.shape, generator=g))
    return m


# ------------------------------------------------------------------------------ slow reference


def reference_forward(m: MoELoRA, x: torch.Tensor, eps: torch.Tensor | None):
    """The obvious per-token computation: route one token, then Σ over its experts of g_i s B_i (A_i x).
    Returns (delta [T, d_out], aux, gates [T, N]). eps [T, N] is the routing noise (None: no noise)."""
    X = x.reshape(-1, m.d_in)
    T = X.shape[0]
    deltas, gate_rows, probs_rows, counts = [], [], [], [0] * m.n_experts
    for t in range(T):
        xt = X[t]
        logits = m.router.weight @ xt  # [N]
        if eps is not None:
            logits = logits + F.softplus(m.noise.weight @ xt) * eps[t]
        probs = torch.softmax(logits, dim=0)
        order = sorted(range(m.n_experts), key=lambda e: -logits[e].item())
        if m.routing == "top_k":
            chosen = order[:m.top_k]
            g = torch.softmax(logits[chosen], dim=0)  # softmax over the kept logits only
        elif m.routing == "dense":
            chosen, g = list(range(m.n_experts)), probs
        else:  # top_p: most probable first, until the running sum reaches p
            chosen, total = [], 0.0
            for e in order:
                chosen.append(e)
                total += probs[e].item()
                if total >= m.top_p:
                    break
            g = probs[chosen] / probs[chosen].sum()
        y = torch.zeros(m.d_out)
        row = torch.zeros(m.n_experts)
        for gi, e in zip(g, chosen):
            y = y + gi * m.scaling * (m.lora_B[e] @ (m.lora_A[e] @ xt))
            row = row + gi * F.one_hot(torch.tensor(e), m.n_experts)
            counts[e] += 1
        deltas.append(y)
        gate_rows.append(row)
        probs_rows.append(probs)
    P = torch.stack(probs_rows).mean(0)
    f = torch.tensor(counts, dtype=torch.float32) / T
    aux = m.n_experts * (P * f).sum()
    return torch.stack(deltas), aux, torch.stack(gate_rows)


@pytest.mark.parametrize("routing", ["top_k", "dense", "top_p"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fast_path_matches_per_token_reference(routing, mode):
    torch.manual_seed(0)
    m = trained_looking(MoELoRA(D_IN, D_OUT, n_experts=E, r=3, routing=routing, top_p=0.6))
    m.train(mode == "train")
    x = torch.randn(2, 5, D_IN)
    eps = torch.randn(10, E) if mode == "train" else None
    fast = m(x, noise=eps)
    ref_delta, ref_aux, ref_gates = reference_forward(m, x, eps)
    assert fast.delta.shape == (2, 5, D_OUT)
    torch.testing.assert_close(fast.delta.reshape(10, D_OUT), ref_delta, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.aux_loss, ref_aux, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.gates(x, noise=eps), ref_gates, atol=1e-6, rtol=1e-6)
    # the released code's form (all experts, einsums, [T, N, d_out]) computes the same function
    naive = NaiveMoELoRA(D_IN, D_OUT, n_experts=E, r=3, routing=routing, top_p=0.6).train(mode == "train")
    naive.load_state_dict(m.state_dict())
    torch.testing.assert_close(naive(x, noise=eps).delta, fast.delta, atol=1e-5, rtol=1e-5)


def test_fast_path_gradients_match_reference():
    """Same function, same gradients: for every parameter, in training mode with identical noise."""
    torch.manual_seed(1)
    m = trained_looking(MoELoRA(D_IN, D_OUT, n_experts=E, r=3)).train()
    x, eps, w = torch.randn(7, D_IN), torch.randn(7, E), torch.randn(7, D_OUT)
    grads = []
    for forward in (lambda: m(x, noise=eps), lambda: reference_forward(m, x, eps)[:2]):
        m.zero_grad()
        delta, aux = forward()
        ((delta.reshape(7, D_OUT) * w).sum() + aux).backward()
        grads.append([p.grad.clone() for p in (m.lora_A, m.lora_B, m.router.weight, m.noise.weight)])
    for fast, ref in zip(*grads):
        assert ref.abs().sum() > 0
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ routing


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_gates_exactly_k_nonzero_summing_to_one(k):
    torch.manual_seed(0)
    m = trained_looking(MoELoRA(D_IN, D_OUT, n_experts=E, top_k=k)).eval()
    x = torch.randn(64, D_IN)
    g = m.gates(x)
    assert g.shape == (64, E)
    assert ((g > 0).sum(-1) == k).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(64))
    # the kept experts are those with the k largest logits, and g is the softmax over their logits
    logits = m.router(x)
    top = logits.topk(k, dim=-1)
    assert torch.equal(g.gather(-1, top.indices) > 0, torch.ones(64, k, dtype=torch.bool))
    torch.testing.assert_close(g.gather(-1, top.indices), top.values.softmax(-1))


def test_top_k_with_tied_logits_still_keeps_exactly_k():
    m = MoELoRA(D_IN, D_OUT, n_experts=E, top_k=2).eval()
    nn.init.zeros_(m.router.weight)  # all logits equal
    g = m.gates(torch.randn(8, D_IN))
    assert ((g > 0).sum(-1) == 2).all()
    torch.testing.assert_close(g[g > 0], torch.full((16,), 0.5))


def test_dense_gates_all_nonzero_summing_to_one():
    torch.manual_seed(0)
    m = trained_looking(MoELoRA(D_IN, D_OUT, n_experts=E, routing="dense")).eval()
    x = torch.randn(64, D_IN)
    g = m.gates(x)
    assert (g > 0).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(64))
    torch.testing.assert_close(g, m.router(x).softmax(-1))


@pytest.mark.parametrize("p", [0.3, 0.5, 0.75, 0.9])
def test_top_p_keeps_smallest_prefix_reaching_p(p):
    torch.manual_seed(0)
    m = trained_looking(MoELoRA(D_IN, D_OUT, n_experts=E, routing="top_p", top_p=p)).eval()
    with torch.no_grad():
        m.router.weight.mul_(0.2)  # flatter probabilities, so that tokens keep different numbers of experts
    x = torch.randn(128, D_IN)
    g = m.gates(x)
    probs = m.router(x).softmax(-1)
    n_kept = (g > 0).sum(-1)
    assert (n_kept >= 1).all()
    sorted_p, order = probs.sort(-1, descending=True)
    cum = sorted_p.cumsum(-1)
    for t in range(128):
        n = n_kept[t].item()
        assert set(order[t, :n].tolist()) == set(torch.nonzero(g[t]).flatten().tolist())  # most probable first
        assert cum[t, n - 1] >= p - 1e-6  # the kept prefix reaches p ...
        assert n == 1 or cum[t, n - 2] < p  # ... and one fewer would not
    torch.testing.assert_close(g.sum(-1), torch.ones(128))
    kept = probs * (g > 0)
    torch.testing.assert_close(g, kept / kept.sum(-1, keepdim=True))
    assert len(set(n_kept.tolist())) > 1, "the test data should exercise different numbers of experts"


def test_bad_routing_arguments_raise():
    with pytest.raises(ValueError, match="routing"):
        MoELoRA(D_IN, D_OUT, routing="top2")
    with pytest.raises(ValueError, match="top_k"):
        MoELoRA(D_IN, D_OUT, n_experts=4, top_k=5)
    with pytest.raises(ValueError, match="top_p"):
        MoELoRA(D_IN, D_OUT, routing="top_p", top_p=0.0)
    with pytest.raises(ValueError, match="routing"):
        route(torch.randn(3, 4), routing="sparse")
    with pytest.raises(ValueError, match="expects inputs"):  # [5, 24] would reshape silently to [10, 12]
        MoELoRA(D_IN, D_OUT)(torch.randn(5, 2 * D_IN))


# ------------------------------------------------------------------------------ noise


def test_no_noise_in_eval_mode_and_noise_in_train_mode():
    torch.manual_seed(0)
    m = MoELoRA(D_IN, D_OUT, n_experts=E)  # W_n = 0 as at init: noise std softplus(0) = ln 2
    nn.init.normal_(m.lora_B)
    x = torch.randn(32, D_IN)
    m.eval()
    torch.manual_seed(1)
    a = m(x).delta
    torch.manual_seed(2)
    assert torch.equal(a, m(x).delta)  # eval: the seed does not matter
    torch.testing.assert_close(a, m(x, noise=torch.randn(32, E)).delta, atol=0, rtol=0)  # nor does noise=
    m.train()
    torch.manual_seed(1)
    b = m(x).delta
    torch.manual_seed(2)
    c = m(x).delta
    assert not torch.allclose(b, c)  # train: different noise, different routing
    assert not torch.allclose(a, b)
    # the default noise is torch.randn of shape [T, N] from the global generator: seeding replays it
    torch.manual_seed(1)
    eps = torch.randn(32, E)
    assert torch.equal(m(x, noise=eps).delta, b)


# ------------------------------------------------------------------------------ init


@pytest.mark.parametrize("routing", ["top_k", "dense", "top_p"])
def test_fresh_adapters_are_exactly_zero(routing):
    torch.manual_seed(0)
    x = torch.randn(3, 4, D_IN)
    for m in (MoELoRA(D_IN, D_OUT, routing=routing), LoRA(D_IN, D_OUT, r=8)):
        for train in (True, False):
            out = m.train(train)(x)
            assert out.delta.shape == (3, 4, D_OUT)
            assert torch.equal(out.delta, torch.zeros(3, 4, D_OUT))
    assert torch.equal(LoRA(D_IN, D_OUT)(x).aux_loss, torch.tensor(0.0))


def test_init_matches_the_paper():
    """Each expert's A is nn.Linear's Kaiming-uniform, U(-1/sqrt(d_in), 1/sqrt(d_in)) — per expert, not with
    the fan-in of the 3-D tensor; router N(0, 0.02); W_n = 0; B = 0."""
    torch.manual_seed(0)
    d_in = 512
    m = MoELoRA(d_in, 64, n_experts=4, r=16)
    bound = 1 / math.sqrt(d_in)
    for A in m.lora_A:
        assert A.abs().max() <= bound and A.abs().max() > 0.95 * bound
        assert abs(A.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    assert not torch.equal(m.lora_A[0], m.lora_A[1])
    assert abs(m.router.weight.std().item() - 0.02) < 0.002
    assert torch.equal(m.noise.weight, torch.zeros(4, d_in)) and torch.equal(m.lora_B, torch.zeros(4, 64, 16))
    lora = LoRA(d_in, 64, r=16)
    assert lora.lora_A.abs().max() <= bound and torch.equal(lora.lora_B, torch.zeros(64, 16))


def test_rslora_scaling():
    assert MoELoRA(D_IN, D_OUT, r=16, lora_alpha=16).scaling == 4.0  # α/√r, the paper's s
    assert MoELoRA(D_IN, D_OUT, r=16, lora_alpha=16, use_rslora=False).scaling == 1.0  # α/r
    assert LoRA(D_IN, D_OUT, r=64, lora_alpha=16).scaling == 2.0
    assert LoRA(D_IN, D_OUT, r=64, lora_alpha=16, use_rslora=False).scaling == 0.25
    # and the forward uses it: Δ = s B A x
    torch.manual_seed(0)
    lora = LoRA(D_IN, D_OUT, r=4, lora_alpha=8, use_rslora=False)
    nn.init.normal_(lora.lora_B)
    x = torch.randn(5, D_IN)
    torch.testing.assert_close(lora(x).delta, 2.0 * x @ lora.lora_A.T @ lora.lora_B.T)


# ------------------------------------------------------------------------------ load balance


def two_cluster_router(a: float) -> MoELoRA:
    """d_in = 2: token [1, 0] has logits [a, a, 0, 0], token [0, 1] has logits [0, 0, a, a]."""
    m = MoELoRA(2, 3, n_experts=4, top_k=2).eval()
    with torch.no_grad():
        m.router.weight.copy_(a * torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))
    return m


def test_aux_loss_balanced_is_k_collapsed_is_larger():
    a = 3.0
    m = two_cluster_router(a)
    tok_a, tok_b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # balanced: half the tokens each way. P_e = 1/4 and f_e = 1/2, so L = N * Σ (1/4)(1/2) = 4 * 4/8 = k = 2
    balanced = m(torch.cat([tok_a, tok_b] * 8)).aux_loss
    torch.testing.assert_close(balanced, torch.tensor(2.0))
    # collapsed: every token to experts 0 and 1. P = [p, p, q, q], f = [1, 1, 0, 0]: L = 4 * 2p -> N as a grows
    p = math.exp(a) / (2 * math.exp(a) + 2)
    collapsed = m(tok_a.repeat(16, 1)).aux_loss
    torch.testing.assert_close(collapsed, torch.tensor(8 * p))
    assert collapsed > balanced + 1.5


@pytest.mark.parametrize("routing,k,expected", [("top_k", 1, 1.0), ("top_k", 2, 2.0), ("top_k", 3, 3.0),
                                                ("dense", 2, 4.0)])
def test_aux_loss_with_uniform_router_probabilities(routing, k, expected):
    """P_e = 1/N (a zero router) makes L = N * (1/N) * Σ f = Σ f = k, whatever the dispatch; dense: Σ f = N."""
    m = MoELoRA(D_IN, D_OUT, n_experts=4, top_k=k, routing=routing).eval()
    nn.init.zeros_(m.router.weight)
    torch.testing.assert_close(m(torch.randn(16, D_IN)).aux_loss, torch.tensor(expected))


def test_aux_loss_gradient_reaches_router_unless_detached():
    torch.manual_seed(0)
    x = torch.randn(10, D_IN)
    m = trained_looking(MoELoRA(D_IN, D_OUT, n_experts=E)).train()
    aux = m(x).aux_loss
    assert aux.requires_grad
    aux.backward()
    assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 1e-6
    assert m.noise.weight.grad.abs().sum() > 1e-6  # P comes from the noisy logits in training
    released = trained_looking(MoELoRA(D_IN, D_OUT, n_experts=E, detach_aux=True)).train()
    aux = released(x).aux_loss
    assert not aux.requires_grad  # the released code's aux loss: a number the optimizer never sees
    (released(x).delta.sum() * 0 + aux).backward()
    assert released.router.weight.grad is None or released.router.weight.grad.abs().sum() == 0


# ------------------------------------------------------------------------------ parameter counts


def test_parameter_counts_reproduce_the_paper():
    tiny_moe = stack_param_count(TINYLLAMA_DIMS, TINYLLAMA_N_LAYERS)
    tiny_lora = stack_param_count(TINYLLAMA_DIMS, TINYLLAMA_N_LAYERS, kind="lora", r=64)
    gemma = stack_param_count(GEMMA3_12B_DIMS, GEMMA3_12B_N_LAYERS)
    assert round(tiny_moe / 1e6, 1) == 53.6
    assert round(tiny_lora / 1e6, 1) == 50.5
    assert round(gemma / 1e6, 1) == 276.7
    assert stack_param_count(TINYLLAMA_DIMS, TINYLLAMA_N_LAYERS, kind="lora") == tiny_lora  # r=64 default
    assert tiny_moe == 53_616_640 and tiny_lora == 50_462_720 and gemma == 276_725_760


def test_parameter_counts_equal_actual_modules():
    assert sum(p.numel() for p in MoELoRA(40, 24, n_experts=3, r=5).parameters()) == moe_lora_param_count(40, 24, 3, 5)
    assert sum(p.numel() for p in LoRA(40, 24, r=7).parameters()) == lora_param_count(40, 24, 7)
    # a whole stack on a small from-scratch model, dims derived the same way as TinyLlama's and Gemma's
    cfg = ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=16)
    dims = llama_projection_dims(cfg.d_model, cfg.ff_dim, cfg.n_head, cfg.n_kv_head, cfg.head_dim)
    for kind, make in (("moe", lambda i, o: MoELoRA(i, o)), ("lora", lambda i, o: LoRA(i, o, r=64))):
        model = Transformer(cfg)
        inject_stacks(model)
        add_stack(model, make)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable == stack_param_count(dims, cfg.n_layer, kind=kind)
