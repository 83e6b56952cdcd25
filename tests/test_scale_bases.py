"""scale/bases.py on tiny Hugging Face models built from in-code configs (nothing is downloaded): the injection
wraps exactly the language model's seven projections per layer, a model with fresh stacks gives the bare
model's logits, and an NF4-loaded base trains a stack while its own tensors stay as they were."""

import copy
import re

import pytest
import torch
from transformers import Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, Gemma3TextConfig
from transformers import LlamaConfig, LlamaForCausalLM

from ministacks.stacks.layer import AdapterConfig, StackedLinear, active_parameters, add_stack, freeze_active, make_adapter
from ministacks.stacks.fingerprint import base_fingerprint
from scale.bases import inject_stacks, load_base

N_LAYERS = 2
# hidden 64: bitsandbytes' CPU 4-bit matmul fails on a projection of 512 weights (hidden 32, k/v 16 wide)
TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
ADAPTER = AdapterConfig(n_experts=4, r=2, top_k=2)


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TEXT)).eval()


def tiny_gemma3_text():
    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(**TEXT, sliding_window=16)).eval()


def tiny_gemma3_vlm():
    """Gemma 3 12B IT's class: a language model beside a vision tower that has q/k/v projections of its own."""
    torch.manual_seed(0)
    cfg = Gemma3Config(text_config=dict(**TEXT, sliding_window=16),
                       vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, image_size=28, patch_size=14),
                       mm_tokens_per_image=4)
    return Gemma3ForConditionalGeneration(cfg).eval()


BUILDERS = {"llama": tiny_llama, "gemma3_text": tiny_gemma3_text, "gemma3_vlm": tiny_gemma3_vlm}
# the language model's projections as full module paths, written out independently of scale/bases.py
LM_PROJECTION = re.compile(r"^(model\.language_model|model)\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")


@pytest.mark.parametrize("kind", BUILDERS)
def test_injection_wraps_exactly_the_language_models_projections(kind):
    model = BUILDERS[kind]()
    expected = {name for name, _ in model.named_modules() if LM_PROJECTION.match(name)}
    assert len(expected) == 7 * N_LAYERS
    inject_stacks(model)
    wrapped = {name for name, m in model.named_modules() if isinstance(m, StackedLinear)}
    assert wrapped == expected
    if kind == "gemma3_vlm":  # the vision tower's own attention projections stay as they were
        vision = [name for name, m in model.named_modules() if name.startswith("model.vision_tower")
                  and name.endswith(("q_proj", "k_proj", "v_proj"))]
        assert vision and not any(isinstance(model.get_submodule(n), StackedLinear) for n in vision)
    assert not any(p.requires_grad for p in model.parameters())  # the base is frozen, every part of it
    inject_stacks(model)  # again: nothing is wrapped twice
    assert {name for name, m in model.named_modules() if isinstance(m, StackedLinear)} == expected


@pytest.mark.parametrize("kind", BUILDERS)
def test_fresh_stacks_give_the_bare_models_logits(kind):
    bare = BUILDERS[kind]()
    model = copy.deepcopy(bare)
    inject_stacks(model)
    fingerprint = base_fingerprint(model)
    x = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        reference = bare(input_ids=x).logits
        assert torch.equal(model(input_ids=x).logits, reference)
        add_stack(model, make_adapter("moe", ADAPTER))  # B starts at zero: the stack adds exactly nothing
        assert torch.equal(model(input_ids=x).logits, reference)
    assert base_fingerprint(model) == fingerprint == base_fingerprint(bare)  # wrapping is not a new base


def test_an_nf4_base_trains_a_stack_and_stays_as_it_was(tmp_path):
    import bitsandbytes as bnb

    tiny_llama().save_pretrained(tmp_path)
    model = load_base(tmp_path, quant="nf4", device="cpu")
    layers = inject_stacks(model)
    assert all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in layers)
    assert layers[0].base_layer.weight.quant_state.quant_type == "nf4"
    fingerprint = base_fingerprint(model)
    again = load_base(tmp_path, quant="nf4", device="cpu")
    inject_stacks(again)
    assert base_fingerprint(again) == fingerprint  # the same checkpoint loads to the same base
    params = add_stack(model, make_adapter("moe", ADAPTER))
    assert params == active_parameters(model) and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    torch.manual_seed(0)
    x = torch.randint(3, 128, (4, 16))
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the stack learns the batch
    assert any(layer.active.lora_B.detach().abs().max().item() > 0 for layer in layers)
    freeze_active(model, "chat")
    assert base_fingerprint(model) == fingerprint  # the 4-bit codes and everything else of the base unchanged


def test_a_missing_base_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot load the base"):
        load_base(tmp_path / "nothing-here", device="cpu")
    with pytest.raises(ValueError, match="quant"):
        load_base(tmp_path, quant="int3", device="cpu")


def test_ministacks_training_round_trains_a_stack_on_an_nf4_hugging_face_base(tmp_path):
    """The same training round, validation loss and data code as the CPU path (ministacks.training), on a
    4-bit Hugging Face base with its own tokenizer behind ministacks' interface (scale/tokens.py)."""
    from transformers import PreTrainedTokenizerFast

    from ministacks.data import load_split
    from ministacks.lm.tokenizer import BOS, EOS, PAD, Tokenizer
    from ministacks.presets import SMOKE
    from ministacks.training.examples import ExampleSet, PackedExamples, example_loss
    from ministacks.training.sft import StackTrainConfig, train_round
    from scale.tokens import PretrainedTokenizer

    train_ex, val_ex = load_split("chat", "train", SMOKE.data), load_split("chat", "val", SMOKE.data)[:8]
    bpe = Tokenizer.train([ex.text() for ex in train_ex], vocab_size=320)
    tok = PretrainedTokenizer(PreTrainedTokenizerFast(tokenizer_object=bpe.hf, bos_token=BOS, eos_token=EOS,
                                                      pad_token=PAD))
    assert tok.encode("hello", eos=True)[-1] == tok.eos_id and tok.decode(tok.encode("hello")) == "hello"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**TEXT, "vocab_size": tok.vocab_size, "max_position_embeddings": 128})
                     ).save_pretrained(tmp_path)
    model = load_base(tmp_path, quant="nf4", device="cpu")
    inject_stacks(model)
    fingerprint = base_fingerprint(model)
    train = PackedExamples(tok, train_ex, completion_only=False, seq_len=64)
    val = ExampleSet(tok, val_ex, completion_only=False, max_len=128)
    cfg = StackTrainConfig(steps=12, batch_size=4, seq_len=64, lr=1e-2, warmup_steps=2, eval_every=4)
    result = train_round(model, make_adapter("moe", ADAPTER), train, lambda: example_loss(model, val), cfg,
                         progress=False)
    assert result.best_loss < result.pre_loss  # the stack lowered the validation loss of a random base
    assert example_loss(model, val) == pytest.approx(result.best_loss, abs=1e-5)  # the best snapshot stays
    freeze_active(model, "chat")
    assert base_fingerprint(model) == fingerprint


def test_gradients_reach_the_input_of_a_4bit_layer_after_a_validation_pass(tmp_path):
    """bitsandbytes would repack a 4-bit weight for its gradient-less CPU kernel at the first eval-mode forward
    without gradients; load_base keeps every layer differentiable (keep_differentiable), so a training step
    after a validation pass still gets the gradient through the base: x.grad = g @ W."""
    import bitsandbytes.functional as BF

    tiny_llama().save_pretrained(tmp_path)
    model = load_base(tmp_path, quant="nf4", device="cpu")
    layer = model.model.layers[0].self_attn.q_proj
    W = BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()  # [d_out, d_in]
    with torch.no_grad():  # a validation pass, as every training round begins with
        model(input_ids=torch.randint(3, 128, (2, 8)))
    model.train()
    x = torch.randn(3, 5, TEXT["hidden_size"], requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    assert x.grad is not None and torch.allclose(x.grad, g @ W, atol=1e-4)
    assert torch.allclose(y, x @ W.t(), atol=1e-4)
