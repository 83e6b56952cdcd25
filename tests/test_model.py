"""Tests for ministacks/model.py: invariants of the from-scratch decoder, and parity with HF Llama."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the network
os.environ["HF_DATASETS_OFFLINE"] = "1"

import math

import pytest
import torch
import torch.nn.functional as F

from ministacks.lm.decode import next_token
from ministacks.lm.model import KVCache, ModelConfig, Transformer, apply_rope, rope_tables

TINY = dict(vocab_size=97, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=64)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**TINY, **overrides}))
    # the default init (std 0.02) gives near-uniform logits; larger weights make the tests sharper
    # (argmax ties impossible, logits far from each other)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model.eval()


def tokens(B: int, T: int, seed: int = 1, vocab: int = 97) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- config


def test_config_roundtrip_and_llama_ffn_rule():
    cfg = ModelConfig(d_model=256)
    assert cfg.ff_dim == 704  # round_up(8/3 * 256 = 682.7, 64)
    assert ModelConfig(d_model=64, d_ff=100).ff_dim == 100
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_layers": 3})
    with pytest.raises(ValueError, match="n_kv_head"):
        ModelConfig(n_head=4, n_kv_head=3)


def test_init_scales_residual_projections_and_ties_head():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=8, d_model=128, n_head=4, n_kv_head=2, vocab_size=512)
    m = Transformer(cfg)
    assert m.lm_head.weight is m.embed_tokens.weight
    q_std = torch.cat([l.self_attn.q_proj.weight.flatten() for l in m.layers]).std().item()
    o_std = torch.cat([l.self_attn.o_proj.weight.flatten() for l in m.layers]).std().item()
    d_std = torch.cat([l.mlp.down_proj.weight.flatten() for l in m.layers]).std().item()
    assert q_std == pytest.approx(0.02, rel=0.05)
    assert o_std == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert d_std == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert all(torch.equal(l.input_layernorm.weight, torch.ones(128)) for l in m.layers)
    # tied matrix counted once; untied adds exactly V*d
    untied = Transformer(ModelConfig(**{**cfg.to_dict(), "tie_embeddings": False}))
    assert untied.num_params() - m.num_params() == 512 * 128
    assert m.num_params() - m.num_params(non_embedding=True) == 512 * 128


# ------------------------------------------------------------------------------- forward pass


def test_shapes_and_hidden_states():
    m = tiny_model()
    x = tokens(3, 10)
    out = m(x, output_hidden_states=True)
    assert out.logits.shape == (3, 10, 97)
    assert out.loss is None
    hs = out.hidden_states
    assert len(hs) == m.cfg.n_layer + 1
    assert all(h.shape == (3, 10, 64) for h in hs)
    assert torch.equal(hs[0], m.embed_tokens(x))
    # the last entry is the final-normed state that feeds lm_head (HF convention) ...
    assert torch.allclose(m.lm_head(hs[-1]), out.logits, atol=1e-6)
    # ... and the one before it is the raw output of layer n_layer-1 (checked by recomputation)
    cos, sin = m.rope_cos[:10], m.rope_sin[:10]
    h1 = m.layers[1](hs[1], cos, sin)
    assert torch.allclose(m.norm(h1), hs[-1], atol=1e-6)
    assert m(x).hidden_states is None


def test_causality():
    m = tiny_model()
    x = tokens(2, 16)
    y = x.clone()
    y[:, 9:] = (y[:, 9:] + 1) % 97  # change every token from position 9 on
    lx, ly = m(x).logits, m(y).logits
    assert torch.allclose(lx[:, :9], ly[:, :9], atol=1e-6)
    assert not torch.allclose(lx[:, 9:], ly[:, 9:], atol=1e-3)  # the change is visible afterwards


def test_loss_matches_manual_cross_entropy_with_ignore_index():
    m = tiny_model()
    x = tokens(2, 12)
    labels = x.clone()
    labels[0, :5] = -100  # e.g. a masked prompt
    labels[1, 7] = -100
    out = m(x, labels)
    logits = out.logits
    total, count = 0.0, 0
    for b in range(2):
        for t in range(11):  # position t predicts labels[t+1]
            target = labels[b, t + 1].item()
            if target == -100:
                continue
            total += -torch.log_softmax(logits[b, t], -1)[target].item()
            count += 1
    assert count == 2 * 11 - 4 - 1
    assert out.loss.item() == pytest.approx(total / count, rel=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    """GQA with K kv heads == MHA whose k/v projections repeat each kv head H/K times."""
    gqa = tiny_model(n_kv_head=2)
    mha = Transformer(ModelConfig(**{**TINY, "n_kv_head": 4})).eval()
    sd = gqa.state_dict()
    hd = gqa.cfg.head_dim
    for i in range(gqa.cfg.n_layer):
        for name in ("k_proj", "v_proj"):
            key = f"layers.{i}.self_attn.{name}.weight"
            w = sd[key].view(2, hd, 64)  # [K, D, d]
            sd[key] = w.repeat_interleave(2, dim=0).reshape(4 * hd, 64)  # query head h uses kv head h // 2
    mha.load_state_dict(sd)
    x = tokens(2, 9)
    assert torch.allclose(gqa(x).logits, mha(x).logits, atol=1e-5)


# ---------------------------------------------------------------------------------------- RoPE


def test_rope_matches_explicit_rotation():
    D, S, theta = 8, 20, 10000.0
    cos, sin = rope_tables(D, S, theta)
    x = torch.randn(1, 1, S, D, generator=torch.Generator().manual_seed(0))
    got = apply_rope(x, cos, sin)
    want = torch.empty_like(x)
    for p in range(S):
        for i in range(D // 2):  # pair (i, i + D/2), angle p * theta^(-2i/D)
            a = p * theta ** (-2 * i / D)
            x1, x2 = x[0, 0, p, i].item(), x[0, 0, p, i + D // 2].item()
            want[0, 0, p, i] = x1 * math.cos(a) - x2 * math.sin(a)
            want[0, 0, p, i + D // 2] = x2 * math.cos(a) + x1 * math.sin(a)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got[..., 0, :], x[..., 0, :])  # position 0 is not rotated
    assert torch.allclose(got.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation keeps length


def test_rope_dot_product_depends_only_on_relative_position():
    D = 16
    cos, sin = rope_tables(D, 64, 10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(D, generator=g), torch.randn(D, generator=g)

    def score(m, n):
        qm = apply_rope(q.view(1, 1, 1, D), cos[m:m + 1], sin[m:m + 1])
        kn = apply_rope(k.view(1, 1, 1, D), cos[n:n + 1], sin[n:n + 1])
        return (qm * kn).sum().item()

    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-4)
    assert score(10, 10) == pytest.approx(score(0, 0), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)  # a different offset does change it


# ------------------------------------------------------------------------------ KV cache, generate


def test_kv_cache_logits_match_full_forward():
    m = tiny_model()
    x = tokens(2, 12)
    full = m(x).logits
    cache = KVCache(m.cfg, batch_size=2, max_len=12)
    prefill = m(x[:, :5], kv_cache=cache).logits  # causal prefill of 5 tokens
    chunk = m(x[:, 5:8], kv_cache=cache).logits  # 3 tokens after a non-empty cache (masked path)
    steps = [m(x[:, t:t + 1], kv_cache=cache).logits for t in range(8, 12)]  # one token at a time
    assert cache.length == 12
    cached = torch.cat([prefill, chunk, *steps], dim=1)
    assert torch.allclose(cached, full, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(), dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                    dict(temperature=1.0, repetition_penalty=1.3)])
def test_generate_with_cache_equals_full_recomputation(kwargs):
    m = tiny_model()
    prompt = tokens(2, 6)
    a = m.generate(prompt, 12, generator=torch.Generator().manual_seed(3), use_cache=True, **kwargs)
    b = m.generate(prompt, 12, generator=torch.Generator().manual_seed(3), use_cache=False, **kwargs)
    assert a.shape == (2, 18)
    assert torch.equal(a[:, :6], prompt)
    assert torch.equal(a, b)


def test_left_padded_prompts_compute_what_each_computes_alone():
    """Prompts of three lengths in one batch, padded on the left (lm/cache.py): every real position's logits
    equal the prompt's own forward, and greedy generation with the cache (and without) continues each row as
    the prompt alone does; a filler query reads its own key only, so no nan reaches a real position."""
    from ministacks.lm.cache import left_padded

    m = tiny_model()
    prompts = [tokens(1, n, seed=n)[0].tolist() for n in (7, 2, 4)]
    ids, pad = left_padded(prompts, 0)
    assert pad.tolist() == [0, 5, 3] and ids[1, :5].tolist() == [0] * 5
    with torch.no_grad():
        logits = m(ids, pad=pad).logits
    assert torch.isfinite(logits).all()
    for b, p in enumerate(prompts):
        with torch.no_grad():
            alone = m(torch.tensor([p])).logits[0]
        torch.testing.assert_close(logits[b, pad[b]:], alone, atol=1e-5, rtol=1e-5)
    together = m.generate(ids, 8, pad=pad)
    assert torch.equal(together, m.generate(ids, 8, pad=pad, use_cache=False))
    for b, p in enumerate(prompts):
        assert torch.equal(together[b, ids.shape[1]:], m.generate(torch.tensor([p]), 8)[0, len(p):])


def test_greedy_is_argmax_and_top_k_1_equals_greedy():
    m = tiny_model()
    prompt = tokens(2, 4)
    greedy = m.generate(prompt, 6)
    # greedy step by step by hand
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, m(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, seq)
    topk1 = m.generate(prompt, 6, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(topk1, greedy)
    # and real sampling differs from greedy somewhere (it is not silently greedy)
    sampled = m.generate(prompt, 6, temperature=2.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(sampled, greedy)


def test_eos_stops_generation_and_is_kept():
    m = tiny_model()
    prompt = tokens(1, 4)
    free = m.generate(prompt, 10)
    eos = free[0, 4 + 3].item()  # make the 4th generated token the eos
    first = (free[0, 4:] == eos).nonzero()[0].item()  # it may already appear earlier
    out = m.generate(prompt, 10, eos_id=eos)
    assert out.shape[1] == 4 + first + 1
    assert out[0, -1].item() == eos
    assert torch.equal(out, free[:, : 4 + first + 1])


def test_eos_pads_finished_rows_in_a_batch():
    m = tiny_model()
    prompt = tokens(2, 4, seed=5)
    free = m.generate(prompt, 8)
    eos = free[0, 5].item()  # row 0 emits it at its 2nd new token
    out = m.generate(prompt, 8, eos_id=eos)
    row0_end = (out[0, 4:] == eos).nonzero()[0].item() + 4
    assert (out[0, row0_end:] == eos).all()  # padded with eos after finishing
    assert torch.equal(out[1], free[1, : out.shape[1]])  # the other row is unaffected


def test_repetition_penalty_ctrl_rule():
    """Crafted logits: token 2 (seen, positive) is divided by p, token 4 (seen, negative) multiplied."""
    logits = torch.tensor([[1.0, 0.5, 3.0, 0.2, -1.0, 2.9]])
    seq = torch.tensor([[2, 4, 2]])
    # without penalty greedy picks 2 (3.0); with p=2, 3.0 -> 1.5 so token 5 (2.9, unseen) wins
    assert next_token(logits, seq, 0.0, None, 1.0, None).item() == 2
    assert next_token(logits, seq, 0.0, None, 2.0, None).item() == 5
    # and the penalised distribution is exactly the CTRL one: 3.0/2 and -1.0*2
    want = torch.tensor([[1.0, 0.5, 1.5, 0.2, -2.0, 2.9]])
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    draws_got = [next_token(logits, seq, 1.0, None, 2.0, g1).item() for _ in range(200)]
    draws_want = [torch.multinomial(F.softmax(want, -1), 1, generator=g2).item() for _ in range(200)]
    assert draws_got == draws_want


def test_generate_rejects_too_long():
    m = tiny_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        m.generate(tokens(1, 60), 10)


# -------------------------------------------------------------------------- parity with HF Llama


@pytest.mark.parametrize("tie", [True, False])
def test_logits_match_hugging_face_llama(tie):
    transformers = pytest.importorskip("transformers")
    m = tiny_model(tie_embeddings=tie, rope_theta=500.0, norm_eps=1e-6)  # non-defaults: both must reach HF
    c = m.cfg
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ff_dim,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_embeddings, hidden_act="silu", attention_bias=False, mlp_bias=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    ours = m.state_dict()
    hf_sd = {k if k.startswith("lm_head") else "model." + k: v for k, v in ours.items()}
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    assert not unexpected
    # every weight copied by name; HF re-ties its lm_head to the embedding when tie_word_embeddings
    assert set(missing) <= ({"lm_head.weight"} if tie else set())
    x = tokens(2, 20)
    with torch.no_grad():
        hf_out = hf(x, output_hidden_states=True)
        our_out = m(x, output_hidden_states=True)
    assert torch.allclose(our_out.logits, hf_out.logits, atol=1e-5)
    assert len(our_out.hidden_states) == len(hf_out.hidden_states)
    for a, b in zip(our_out.hidden_states, hf_out.hidden_states):
        assert torch.allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------------------------ save/load


def test_safetensors_roundtrip_keeps_tie_and_logits(tmp_path):
    from safetensors.torch import load_file, save_file

    m = tiny_model()
    with pytest.raises(RuntimeError):  # why state_dict_for_save exists: shared tensors are refused
        save_file(m.state_dict(), tmp_path / "raw.safetensors")
    path = tmp_path / "model.safetensors"
    sd = m.state_dict_for_save()
    assert "lm_head.weight" not in sd
    save_file(sd, path)

    fresh = tiny_model(seed=123)
    x = tokens(2, 10)
    assert not torch.equal(fresh(x).logits, m(x).logits)
    fresh.load_state_dict_from_save(load_file(path))
    assert fresh.lm_head.weight is fresh.embed_tokens.weight
    assert torch.equal(fresh(x).logits, m(x).logits)  # bitwise

    with pytest.raises(ValueError, match="does not match"):
        fresh.load_state_dict_from_save({k: v for k, v in sd.items() if "norm" not in k})


def test_hidden_states_without_logits():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=16)).eval()
    x = torch.randint(0, 64, (2, 10))
    full = m(x, output_hidden_states=True)
    lean = m(x, output_hidden_states=True, return_logits=False)
    assert lean.logits is None and full.logits is not None
    assert all(torch.equal(a, b) for a, b in zip(full.hidden_states, lean.hidden_states))
