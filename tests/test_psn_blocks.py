"""PSN v2's capability blocks: a fresh block is the identity and its base stays frozen, a block's gradient reaches
only its own parameters, a block kept out of an earlier block's directions writes nothing into them, and a
trained block changes the model."""

import torch

from ministacks.lm.model import ModelConfig, Transformer
from ministacks.psn.blocks import BlockConfig, CapabilityBlock, MoEProjection
from ministacks.psn.model import PSNModel

CFG = ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=32)
BLOCK = BlockConfig(n_layer=1, r=4)


def _model():
    torch.manual_seed(0)
    return PSNModel(Transformer(CFG).eval())


def _ids(seed=1):
    return torch.randint(0, CFG.vocab_size, (3, 12), generator=torch.Generator().manual_seed(seed))


def _step(model, domain, ids, lr=1e-2, steps=3):
    params = list(model.blocks[domain].parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    for _ in range(steps):
        out = model(ids, labels=ids)
        loss = out.loss + BLOCK.aux_weight * model.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return params


def test_every_projection_is_a_mixture_of_experts_and_a_fresh_block_is_the_identity():
    block = CapabilityBlock(CFG, BLOCK)
    assert sum(isinstance(m, MoEProjection) for m in block.modules()) == 7 * BLOCK.n_layer
    # the only dense linear left is out_proj (the experts' routers are MoE-LoRA's own)
    dense = [name for name, m in block.named_modules() if type(m) is torch.nn.Linear and ".moe." not in name]
    assert dense == ["out_proj"]
    model = _model()
    ids = _ids()
    bare = model.base(ids).logits
    model.add_block("code", BLOCK)
    assert torch.equal(model(ids).logits, bare)


def test_the_base_stays_frozen_and_a_blocks_gradient_reaches_only_its_own_parameters():
    model = _model()
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    model.add_block("chat", BLOCK)
    model.add_block("code", BLOCK)
    model.weights["chat"] = 0.0  # code trains; chat is off, as an earlier domain's block would be
    chat_before = {k: v.clone() for k, v in model.blocks["chat"].state_dict().items()}
    ids = _ids()
    _step(model, "code", ids)
    assert all(not p.requires_grad for p in model.base.parameters())
    assert all(p.grad is None for p in model.base.parameters())
    assert all(p.grad is None for p in model.blocks["chat"].parameters())
    assert all(torch.equal(v, base_before[k]) for k, v in model.base.state_dict().items())
    assert all(torch.equal(v, chat_before[k]) for k, v in model.blocks["chat"].state_dict().items())
    # and it learnt something: the model is no longer the base
    assert not torch.allclose(model(ids).logits, model.base(ids).logits)


def test_a_block_kept_out_of_an_earlier_blocks_directions_writes_nothing_into_them():
    model = _model()
    ids = _ids()
    model.add_block("chat", BLOCK)
    _step(model, "chat", ids, steps=5)
    cos, sin = model.base.rope_cos[:12], model.base.rope_sin[:12]
    with torch.no_grad():
        c_chat = model.blocks["chat"](model.base.embed_tokens(ids), cos, sin).reshape(-1, CFG.d_model)  # [N, d]
    V = torch.linalg.svd(c_chat, full_matrices=False).Vh[:4].T  # [d, 4]: the chat block's top output directions
    model.weights["chat"] = 0.0
    code = model.add_block("code", BLOCK)
    code.basis = V
    _step(model, "code", _ids(2), steps=5)
    with torch.no_grad():
        c_code = code(model.base.embed_tokens(ids), cos, sin).reshape(-1, CFG.d_model)
    assert c_code.abs().max() > 1e-4  # the code block writes ...
    assert (c_code @ V).abs().max() < 1e-5 * c_code.abs().max()  # ... but nothing along the chat block's directions


def test_blocks_trained_in_order_stay_out_of_each_others_directions(tmp_path):
    from ministacks.data.example import Example
    from ministacks.lm.tokenizer import Tokenizer
    from ministacks.psn.train import block_directions, train_block, united_basis
    from ministacks.training.examples import ExampleSet, PackedExamples

    texts = {"chat": [f"Hello number {i}, how are you?" for i in range(40)],
             "math": [f"Calculate {i} + {i}. The answer is {2 * i}." for i in range(40)]}
    tok = Tokenizer.train([t for ts in texts.values() for t in ts] * 3, vocab_size=200)
    torch.manual_seed(0)
    model = PSNModel(Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=32, n_head=4, n_kv_head=2,
                                             max_seq_len=64)).eval())
    cfg = BlockConfig(n_layer=1, r=4, steps=12, eval_every=4, batch_size=4, ns_k=4)
    data = {d: [Example(d, t, "", t, None, "test") for t in ts] for d, ts in texts.items()}
    sets = {d: (PackedExamples(tok, exs, False, 32), ExampleSet(tok, exs[:8], False, 64)) for d, exs in data.items()}
    chat = train_block(model, "chat", *sets["chat"], cfg, progress=False)
    assert chat["best_loss"] < chat["pre_loss"]  # a block learns its domain
    V = united_basis([block_directions(model, "chat", sets["chat"][1], cfg.ns_k)], 32)
    assert V.shape == (32, 4) and torch.allclose(V.T @ V, torch.eye(4), atol=1e-5)
    math_ = train_block(model, "math", *sets["math"], cfg, basis=V, progress=False)
    assert math_["protected"] == 4
    later = block_directions(model, "math", sets["math"][1], 4)
    assert (V.T @ later).abs().max() < 1e-4  # math's block writes nothing into chat's directions
