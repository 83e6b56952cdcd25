"""A tiny model with frozen MoE-LoRA stacks that do real work, shared by the tests of routed batches."""

import torch

from ministacks.lm.model import ModelConfig, Transformer
from ministacks.stacks.layer import AdapterConfig, add_stack, freeze_active, inject_stacks, make_adapter, stacked_layers


def tiny_stacked(vocab_size: int, domains: tuple[str, ...], std: float, seed: int) -> Transformer:
    """A random 2-layer base with one frozen stack per entry of `domains` (in order; a domain may repeat),
    each with random B of `std` (a fresh stack's B is zero, and a zero stack would make every setting agree),
    in eval mode."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=512,
                                    vocab_size=vocab_size))
    inject_stacks(model)
    for domain in domains:
        add_stack(model, make_adapter("moe", AdapterConfig(r=4)))
        with torch.no_grad():
            for layer in stacked_layers(model):
                layer.active.lora_B.normal_(std=std)
        freeze_active(model, domain)
    return model.eval()
