"""Our single LoRA against the library a user would pick instead: given the same weights on the same seven
projections of the same Hugging Face base, ministacks' LoRA (rsLoRA scaling) and peft's give the same logits."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from ministacks.stacks.layer import TARGET_MODULES, AdapterConfig, add_stack, make_adapter
from scale.bases import inject_stacks


@pytest.mark.parametrize("use_rslora", [True, False])
def test_our_lora_and_peft_give_the_same_logits_with_the_same_weights(use_rslora):
    torch.manual_seed(0)
    bare = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        max_position_embeddings=64)).eval()
    ours = copy.deepcopy(bare)
    layers = inject_stacks(ours)
    cfg = AdapterConfig(lora_r=8, lora_alpha=16.0, use_rslora=use_rslora)
    add_stack(ours, make_adapter("lora", cfg))
    theirs = get_peft_model(copy.deepcopy(bare), LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                             target_modules=list(TARGET_MODULES), use_rslora=use_rslora))
    # random A and B (a fresh B is zero on both sides, which would make any two LoRAs agree), copied across
    names = {name: m for name, m in ours.named_modules() if m in layers}
    peft_layers = dict(theirs.base_model.model.named_modules())
    assert len(names) == 7 * 2
    with torch.no_grad():
        for name, layer in names.items():
            layer.active.lora_A.normal_(std=0.2)
            layer.active.lora_B.normal_(std=0.2)
            target = peft_layers[name]
            target.lora_A["default"].weight.copy_(layer.active.lora_A)  # [r, d_in]
            target.lora_B["default"].weight.copy_(layer.active.lora_B)  # [d_out, r]
            assert target.scaling["default"] == pytest.approx(layer.active.scaling)
    x = torch.randint(0, 128, (2, 10))
    theirs.eval()
    with torch.no_grad():
        a, b = ours(input_ids=x).logits, theirs(input_ids=x).logits
        assert not torch.allclose(a, bare(input_ids=x).logits, atol=1e-3)  # the adapters do change the output
    assert torch.allclose(a, b, atol=1e-5)
