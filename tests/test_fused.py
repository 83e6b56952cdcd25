"""The fused inference pass (stacks/fused.py) against the stack-by-stack loop: per layer, per group of
projections that read one input (q/k/v, gate/up), over a whole model and through generation."""

import pytest
import torch
import torch.nn as nn

from ministacks.adapters.moe_lora import MoELoRA
from ministacks.lm.model import ModelConfig, Transformer
from ministacks.stacks.fused import FusedStacks, _softmax
from ministacks.stacks.layer import (TARGET_MODULES, AdapterConfig, StackedLinear, StacksOn, add_stack, freeze_active,
                                     inject_stacks, make_adapter, set_stacks, stacked_layers)

CFG = ModelConfig(vocab_size=97, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=48)
ONS = [StacksOn.ungated(), StacksOn.weighted({"chat": 0.7, "code": 0.4}),
       StacksOn.weighted({"chat": 1.0, "code": 0.05}), StacksOn.weighted({"code": 0.9})]


def _perturb(model, std=0.05):
    """Trained stacks have non-zero B (a fresh one is the identity, which would hide any mistake)."""
    with torch.no_grad():
        for layer in stacked_layers(model):
            layer.active.lora_B.normal_(std=std)


def _stacked(plan=(("chat", "moe"), ("code", "lora"), ("chat", "moe"), ("code", "moe")),
             cfg: AdapterConfig = AdapterConfig(r=4, lora_r=8), target_modules=TARGET_MODULES):
    torch.manual_seed(0)
    model = Transformer(CFG)
    inject_stacks(model, target_modules)
    for domain, kind in plan:
        add_stack(model, make_adapter(kind, cfg))
        _perturb(model)
        freeze_active(model, domain)
    return model.eval()


def _loop(model, fn):
    """fn() with every layer on the stack-by-stack reference path."""
    layers = list(stacked_layers(model))
    for layer in layers:
        layer.use_fused = False
    try:
        return fn()
    finally:
        for layer in layers:
            layer.use_fused = True


def _ids(batch=2, seq=12, seed=0):
    return torch.randint(0, CFG.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("on", ONS, ids=["ungated", "weighted", "one-skipped", "one-domain"])
def test_model_with_joint_passes_equals_the_loop(on):
    """LoRA and MoE-LoRA stacks mixed (several runs in one pass), domain weights, a skipped domain."""
    model = _stacked()
    set_stacks(model, on)
    x = _ids()
    fused = model(x).logits
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert attn.q_proj._joint is not None and mlp.gate_proj._joint is not None  # the joint path ran
    assert attn.o_proj._fused is not None and attn.k_proj._fused is None  # o alone; k only inside q's group
    torch.testing.assert_close(fused, _loop(model, lambda: model(x).logits), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("routing, top_k", [("top_k", 1), ("top_k", 2), ("top_k", 3), ("dense", 2), ("top_p", 2)])
def test_every_routing_fuses_exactly(routing, top_k):
    model = _stacked(plan=(("chat", "moe"), ("code", "moe")), cfg=AdapterConfig(r=4, top_k=top_k, routing=routing))
    x = _ids()
    torch.testing.assert_close(model(x).logits, _loop(model, lambda: model(x).logits), atol=1e-5, rtol=1e-5)
    layer = model.layers[1].mlp.down_proj
    for h in (torch.randn(1, layer.in_features), torch.randn(3, 5, layer.in_features)):  # one token; [B, T, d]
        torch.testing.assert_close(layer.frozen_delta(h), layer.frozen_delta_loop(h), atol=1e-6, rtol=1e-5)


def test_top2_gates_are_the_softmax_of_the_two_kept_logits():
    for k in (2, 3):
        kept = torch.randn(5, 3, k, 1) * 10  # [T, S, k, 1]
        torch.testing.assert_close(_softmax(kept), kept.softmax(dim=2))


def test_group_pass_equals_each_projection_called_alone():
    model = _stacked()
    attn = model.layers[1].self_attn
    x = torch.randn(2, 7, CFG.d_model)
    joint = attn.q_proj.joint_forward(x, (attn.q_proj, attn.k_proj, attn.v_proj))
    alone = _loop(model, lambda: [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)])
    assert [tuple(y.shape) for y in joint] == [(2, 7, 64), (2, 7, 32), (2, 7, 32)]
    for a, b in zip(joint, alone):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the deltas alone, without the base
    deltas = attn.q_proj._joint(x, with_base=False)
    for d, layer in zip(deltas, (attn.q_proj, attn.k_proj, attn.v_proj)):
        torch.testing.assert_close(d, layer.frozen_delta_loop(x), atol=1e-6, rtol=1e-5)


def test_a_layer_with_a_biased_base_fuses_its_bias_once():
    torch.manual_seed(0)
    layer = StackedLinear(nn.Linear(16, 8, bias=True))
    layer.stacks["chat"] = nn.ModuleList([MoELoRA(16, 8, r=2).eval(), MoELoRA(16, 8, r=2).eval()])
    for a in layer.stacks["chat"]:
        nn.init.normal_(a.lora_B, std=0.1)
    x = torch.randn(4, 16)
    fused = layer(x)
    torch.testing.assert_close(fused, layer.base_layer(x) + layer.frozen_delta_loop(x), atol=1e-6, rtol=1e-5)
    assert isinstance(layer._fused, FusedStacks)


def test_generation_with_the_kv_cache_gives_the_references_tokens():
    model = _stacked()
    prompt = _ids(batch=1, seq=9)
    for on in (StacksOn.ungated(), StacksOn.weighted({"chat": 0.9, "code": 0.2})):
        set_stacks(model, on)
        fused = model.generate(prompt, 16)
        assert torch.equal(fused, _loop(model, lambda: model.generate(prompt, 16)))
        assert torch.equal(fused, _loop(model, lambda: model.generate(prompt, 16, use_cache=False)))


def test_base_only_is_the_base_model_exactly():
    torch.manual_seed(0)
    base = Transformer(CFG).eval()
    x = _ids()
    ref = base(x).logits
    model = _stacked()
    set_stacks(model, StacksOn.base_only())
    assert torch.equal(model(x).logits, ref)
    assert all(layer._joint is None and layer._fused is None for layer in stacked_layers(model))
    set_stacks(model, StacksOn.weighted({}))  # no domain on: no pass to build, the base alone
    assert torch.equal(model(x).logits, ref)


def test_only_some_projections_wrapped_runs_them_one_by_one():
    model = _stacked(plan=(("chat", "moe"),), target_modules=("q_proj", "v_proj", "up_proj"))
    x = _ids()
    fused = model(x).logits
    assert model.layers[0].self_attn.q_proj._joint is None  # k_proj is a plain Linear: no group
    torch.testing.assert_close(fused, _loop(model, lambda: model(x).logits), atol=1e-5, rtol=1e-5)


def test_an_active_stack_or_a_hook_keeps_every_projection_a_module_call():
    """Training and null-space collection must see every projection called as today."""
    model = _stacked()
    x = _ids()
    k_proj = model.layers[0].self_attn.k_proj
    seen = []
    handle = k_proj.register_forward_hook(lambda mod, inputs, out: seen.append(inputs[0].shape))
    ref = _loop(model, lambda: model(x).logits)
    seen.clear()
    torch.testing.assert_close(model(x).logits, ref, atol=1e-5, rtol=1e-5)
    assert seen == [torch.Size([2, 12, CFG.d_model])]  # the hook saw its call
    assert model.layers[0].self_attn.q_proj._joint is None
    handle.remove()

    add_stack(model, make_adapter("moe", AdapterConfig(r=4)))
    _perturb(model)
    model.train(True)
    out = model(x, labels=x)
    assert all(layer.last_aux is not None for layer in stacked_layers(model))  # every active stack ran
    out.loss.backward()
    assert all(layer.active.lora_B.grad is not None for layer in stacked_layers(model))


def test_a_changed_stack_is_noticed():
    model = _stacked()
    x = _ids()
    before = model(x).logits
    # an in-place edit of a frozen stack's parameters, then invalidate() (the pass holds its own copies)
    with torch.no_grad():
        for layer in stacked_layers(model):
            layer.stacks["chat"][0].lora_B.mul_(2)
    for layer in stacked_layers(model):
        layer.invalidate()
    edited = model(x).logits
    assert not torch.allclose(edited, before)
    torch.testing.assert_close(edited, _loop(model, lambda: model(x).logits), atol=1e-5, rtol=1e-5)
    # a stack deleted by hand: invalidate() again
    for layer in stacked_layers(model):
        del layer.stacks["code"][1]
        layer.invalidate()
    assert model.layers[0].self_attn.q_proj._joint is None  # dropped, rebuilt on the next call
    torch.testing.assert_close(model(x).logits, _loop(model, lambda: model(x).logits), atol=1e-5, rtol=1e-5)


def test_noisy_frozen_stacks_take_the_loop_in_train_mode_and_the_fused_pass_in_eval_mode():
    model = _stacked(plan=(("chat", "moe"),))
    add_stack(model, make_adapter("moe", AdapterConfig(r=4)))
    _perturb(model)
    freeze_active(model, "code", keep_train_mode=True)  # the released code's noisy frozen stacks
    x = _ids()
    model.train(True)
    torch.manual_seed(1)
    a = model(x).logits
    torch.manual_seed(2)
    assert not torch.allclose(a, model(x).logits)  # routing noise: the loop runs
    assert all(layer._fused is None and layer._joint is None for layer in stacked_layers(model))
    model.train(False)
    fused = model(x).logits
    assert model.layers[0].self_attn.q_proj._joint is not None
    torch.testing.assert_close(fused, _loop(model, lambda: model(x).logits), atol=1e-5, rtol=1e-5)


def test_per_row_weights_give_each_row_what_it_gives_alone():
    """Prompts routed apart share a batch (StacksOn.per_row): each row equals its own forward under its own
    setting, fused (joint passes and single ones) and stack by stack, with a domain skipped in one row only,
    an ungated row and a base-like row ({}) among them."""
    model = _stacked()
    rows = [ONS[1], ONS[2], StacksOn.ungated(), StacksOn.weighted({})]
    x = _ids(batch=len(rows))
    alone = []
    for b, on in enumerate(rows):
        set_stacks(model, on)
        alone.append(model(x[b : b + 1]).logits)
    set_stacks(model, StacksOn.per_row(rows))
    fused = model(x).logits
    assert model.layers[0].self_attn.q_proj._joint.W is not None  # the per-row pass ran
    for b in range(len(rows)):
        torch.testing.assert_close(fused[b : b + 1], alone[b], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, _loop(model, lambda: model(x).logits), atol=1e-5, rtol=1e-5)
    # through generation with the KV cache: one new token per row per step
    set_stacks(model, StacksOn.per_row(rows[:2]))
    both = model.generate(x[:2, :9], 8)
    for b in range(2):
        set_stacks(model, rows[b])
        assert torch.equal(both[b : b + 1], model.generate(x[b : b + 1, :9], 8))


def test_per_row_settings_that_agree_are_the_plain_setting_and_a_wrong_batch_is_refused():
    on = StacksOn.weighted({"chat": 0.5})
    assert StacksOn.per_row([on, on]) == on
    rows = StacksOn.per_row([on, StacksOn.ungated()])
    assert rows.row_weights("chat") == [0.5, 1.0] and rows.row_weights("code") == [0.0, 1.0]
    assert rows.live(["chat", "code", "math"]) == ["chat", "code", "math"]
    assert StacksOn.per_row([on, StacksOn.weighted({"code": 0.1})]).live(["chat", "code"]) == ["chat"]
    with pytest.raises(TypeError, match="row_weights"):
        rows.weight_of("chat")
    model = _stacked()
    set_stacks(model, rows)
    with pytest.raises(ValueError, match="2 rows"):
        model(_ids(batch=3))
    with pytest.raises(ValueError, match="2 rows"):
        _loop(model, lambda: model(_ids(batch=3)))
