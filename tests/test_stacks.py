"""Stacked layers: identity on add, frozen means frozen, fused == loop, skipped domains cost nothing."""

import pytest
import torch
import torch.nn as nn

from ministacks.adapters.lora import LoRA
from ministacks.lm.model import ModelConfig, Transformer
from ministacks.adapters.moe_lora import MoELoRA
from ministacks.stacks.layer import (StackedLinear, TARGET_MODULES, active_parameters, add_stack,
                               freeze_active, inject_stacks, make_adapter, StacksOn, set_stacks,
                               stacked_layers, stacks_on)
from ministacks.stacks.selection import SKIP_THRESHOLD

CFG = ModelConfig(vocab_size=97, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=32)


def _model():
    torch.manual_seed(0)
    return Transformer(CFG).eval()


def _perturb_active(model, std=0.05):
    """Trained stacks have non-zero B; fake that so that stacks do something."""
    with torch.no_grad():
        for layer in stacked_layers(model):
            layer.active.lora_B.normal_(std=std)


def _stacked(domains=("chat", "code", "chat"), kinds=("moe", "lora", "moe")):
    model = _model()
    inject_stacks(model)
    for domain, kind in zip(domains, kinds):
        add_stack(model, make_adapter(kind))
        _perturb_active(model)
        freeze_active(model, domain)
    model.train(False)
    return model


def test_inject_wraps_exactly_the_seven_projections_per_layer():
    model = _model()
    layers = inject_stacks(model)
    assert len(layers) == 7 * CFG.n_layer
    wrapped = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, StackedLinear)}
    assert wrapped == set(TARGET_MODULES)
    assert len(inject_stacks(model)) == len(layers)  # idempotent: no double wrapping
    with pytest.raises(ValueError, match="no module"):
        inject_stacks(nn.Sequential(nn.Linear(2, 2)))


def test_stacked_layers_are_every_stacked_linear_in_module_order():
    """The walk skips the inside of a stacked layer (its adapters): the same layers, in the same order, as
    a walk of every module, with frozen and active stacks on, and on a model wrapped inside another."""
    model = _stacked()
    add_stack(model, make_adapter("moe"))
    # the model twice inside another: its layers once each, as modules() gives them
    for m in (model, nn.Sequential(nn.Linear(2, 2), model), nn.Sequential(model, model)):
        every = [x for x in m.modules() if isinstance(x, StackedLinear)]
        assert list(stacked_layers(m)) == every and len(every) == 7 * CFG.n_layer


@pytest.mark.parametrize("kind", ["moe", "lora"])
def test_adding_a_stack_is_bitwise_identity(kind):
    model = _model()
    x = torch.randint(0, 97, (2, 16))
    ref = model(x).logits
    inject_stacks(model)
    assert torch.equal(model(x).logits, ref)
    add_stack(model, make_adapter(kind))
    model.train(False)
    assert torch.equal(model(x).logits, ref)
    freeze_active(model, "chat")
    assert torch.equal(model(x).logits, ref)


def test_only_the_active_stack_trains_and_frozen_never_change():
    model = _stacked()
    frozen_before = {n: p.clone() for n, p in model.named_parameters()}
    params = add_stack(model, make_adapter("moe"))
    assert {id(p) for p in params} == {id(p) for p in active_parameters(model)}
    assert all(p.requires_grad for p in params)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params}, "nothing but the active stack may be trainable"
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train(True)
    x = torch.randint(0, 97, (2, 16))
    for _ in range(3):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            if id(p) not in trainable:
                assert p.grad is None, f"{name} got a gradient"
        opt.step()
    for name, p in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(p, frozen_before[name]), f"{name} changed"
    # frozen adapters stay in eval mode (no routing noise) while the model trains
    assert all(not a.training for layer in stacked_layers(model) for s in layer.stacks.values() for a in s)


def test_released_code_train_mode_frozen_stacks_flag():
    model = _model()
    inject_stacks(model)
    add_stack(model, make_adapter("moe"))
    freeze_active(model, "chat", keep_train_mode=True)
    model.train(True)
    assert all(a.training for layer in stacked_layers(model) for a in layer.stacks["chat"])
    model.train(False)
    assert not any(a.training for layer in stacked_layers(model) for a in layer.stacks["chat"])


@pytest.mark.parametrize("weights", [None, {"chat": 0.7, "code": 0.4}, {"chat": 1.0, "code": 0.05}])
def test_fused_multi_stack_inference_equals_the_loop(weights):
    model = _stacked()
    set_stacks(model, StacksOn.from_json(weights))
    x = torch.randint(0, 97, (3, 16))
    fused = model(x).logits
    for layer in stacked_layers(model):
        layer.use_fused = False
    loop = model(x).logits
    torch.testing.assert_close(fused, loop, atol=1e-5, rtol=1e-5)
    # and per layer, on a random input
    layer = next(stacked_layers(model))
    h = torch.randn(5, layer.in_features)
    layer.use_fused = True
    torch.testing.assert_close(layer.frozen_delta(h), layer.frozen_delta_loop(h), atol=1e-6, rtol=1e-5)


def test_a_domain_at_or_below_threshold_costs_nothing_and_adds_nothing():
    model = _stacked()
    calls = []
    for layer in stacked_layers(model):
        for adapter in layer.stacks["code"]:
            adapter.register_forward_hook(lambda *a: calls.append(1))
        layer.use_fused = False  # the loop calls adapters as modules, so the hook sees every call
    x = torch.randint(0, 97, (2, 16))
    set_stacks(model, StacksOn.weighted({"chat": 1.0, "code": SKIP_THRESHOLD}))
    with_code_off = model(x).logits
    assert calls == []
    set_stacks(model, StacksOn.weighted({"chat": 1.0}))
    torch.testing.assert_close(with_code_off, model(x).logits, atol=0, rtol=0)
    set_stacks(model, StacksOn.weighted({"chat": 1.0, "code": 0.5}))
    assert not torch.allclose(model(x).logits, with_code_off)
    assert calls  # above the threshold the stack does run
    # fused path: the skipped domain's columns are not even in the concatenated matrices
    for layer in stacked_layers(model):
        layer.use_fused = True
    set_stacks(model, StacksOn.weighted({"chat": 1.0, "code": 0.1}))
    model(x)
    attn = model.layers[0].self_attn
    n_chat_cols = sum(a.n_experts * a.r for a in attn.o_proj.stacks["chat"])
    n_chat_router_rows = sum(a.n_experts for a in attn.o_proj.stacks["chat"])
    o = attn.o_proj._fused  # o_proj's own pass
    assert o.C == n_chat_cols and o.Bt[0].shape[0] == n_chat_cols
    assert o.AR.shape[0] == n_chat_cols + n_chat_router_rows
    qkv = attn.q_proj._joint  # q, k and v in one pass: three times chat's columns, nothing of code's
    assert qkv.C == 3 * n_chat_cols and [Bt.shape[0] for Bt in qkv.Bt] == [n_chat_cols] * 3
    assert qkv.AR.shape[0] == 3 * (n_chat_cols + n_chat_router_rows)


def test_ungated_weighted_and_base_only_switches():
    model = _stacked()
    x = torch.randint(0, 97, (2, 16))
    with stacks_on(model, StacksOn.base_only()):
        base = model(x).logits
    assert all(layer.on == StacksOn.ungated() for layer in stacked_layers(model))  # restored after the block
    ungated = model(x).logits
    set_stacks(model, StacksOn.weighted({"chat": 1.0, "code": 1.0}))
    torch.testing.assert_close(model(x).logits, ungated, atol=0, rtol=0)  # all weights 1 == ungated
    set_stacks(model, StacksOn.weighted({}))
    torch.testing.assert_close(model(x).logits, base, atol=0, rtol=0)  # no domain on == base
    assert StacksOn.from_json({}) == StacksOn.base_only() and StacksOn.from_json(None) == StacksOn.ungated()
    assert StacksOn.base_only().as_json() == {} and StacksOn.weighted({"chat": 0.5}).as_json() == {"chat": 0.5}
    assert not torch.allclose(base, ungated)


def test_stacks_on_a_hugging_face_llama_are_identity_until_trained():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    hf.eval()
    x = torch.randint(0, 97, (2, 12))
    ref = hf(x).logits
    layers = inject_stacks(hf)
    assert len(layers) == 7 * 2
    add_stack(hf, make_adapter("moe"))
    hf.train(False)
    assert torch.equal(hf(x).logits, ref)
    _perturb_active(hf)
    assert not torch.allclose(hf(x).logits, ref)  # the stack really is in the forward path
    loss = hf(x, labels=x).loss
    loss.backward()
    assert all(p.grad is not None for p in active_parameters(hf))
    assert all(p.grad is None for n, p in hf.named_parameters() if "active" not in n)


def test_adapters_are_what_the_factory_says():
    model = _model()
    inject_stacks(model)
    add_stack(model, make_adapter("lora"))
    assert all(isinstance(layer.active, LoRA) and layer.active.r == 64 for layer in stacked_layers(model))
    with pytest.raises(RuntimeError, match="already active"):
        add_stack(model, make_adapter("moe"))
    freeze_active(model, "x")
    add_stack(model, make_adapter("moe"))
    assert all(isinstance(layer.active, MoELoRA) for layer in stacked_layers(model))
    with pytest.raises(ValueError, match="unknown adapter kind"):
        make_adapter("mlp")


class _Reference(nn.Module):
    """The obvious form of a stacked projection: base + Σ frozen + active, every term in autograd."""

    def __init__(self, layer: StackedLinear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        y = self.layer.base_layer(x)
        for stack in self.layer.stacks.values():
            for adapter in stack:
                y = y + adapter(x).delta
        return y + self.layer.active(x).delta


@pytest.mark.parametrize("fused", [True, False])
def test_gradients_flow_through_frozen_stacks_to_earlier_layers(fused):
    """The active stack of layer 0 feeds layer 1, whose frozen stacks depend on their input: the
    gradient must include that path (computing frozen deltas under no_grad would silently drop it)."""
    model = _stacked()
    add_stack(model, make_adapter("moe"))
    _perturb_active(model, std=0.1)
    model.train(False)  # no routing noise: both forms must compute the same function
    for layer in stacked_layers(model):
        layer.use_fused = fused
    x = torch.randint(0, 97, (2, 16))
    model(x, labels=x).loss.backward()
    grads = [p.grad.clone() for p in active_parameters(model)]
    for p in active_parameters(model):
        p.grad = None
    # the same model with every StackedLinear replaced by the obvious reference
    for name, mod in list(model.named_modules()):
        if isinstance(mod, StackedLinear):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], _Reference(mod))
    model(x, labels=x).loss.backward()
    for g, p in zip(grads, [p for m in model.modules() if isinstance(m, _Reference) for p in m.layer.active.parameters()]):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)


def test_a_bf16_base_gets_fp32_stacks_that_add_their_delta_in_its_dtype():
    """A 4-bit base on a GPU computes in bf16; the stacks keep fp32 parameters, read x in fp32 and add their delta
    in the base's dtype (QLoRA's mixed precision), the frozen ones as well as the one in training."""
    from ministacks.stacks.layer import AdapterConfig, StackedLinear, add_stack, freeze_active, make_adapter

    torch.manual_seed(0)
    holder = nn.Module()
    holder.proj = StackedLinear(nn.Linear(16, 8).to(torch.bfloat16))
    (p, *_), x = add_stack(holder, make_adapter("lora", AdapterConfig(lora_r=4))), torch.randn(3, 16)
    with torch.no_grad():
        holder.proj.active.lora_B.normal_()
    y = holder.proj(x.bfloat16())
    assert y.dtype == torch.bfloat16 and p.dtype == torch.float32
    expected = holder.proj.base_layer(x.bfloat16()).float() + holder.proj.active(x).delta
    assert torch.allclose(y.float(), expected, rtol=2e-2, atol=2e-2)  # bf16 keeps 8 bits of mantissa
    y.float().sum().backward()
    assert p.grad is not None and p.grad.dtype == torch.float32
    freeze_active(holder, "chat")
    assert holder.proj(x.bfloat16()).dtype == torch.bfloat16  # the frozen stack too
