"""Pretrained bases: any Hugging Face causal LM, loaded frozen (in NF4 by default), its language model's seven
projections wrapped with ministacks' stacked layer.

    model = load_base("HuggingFaceTB/SmolLM2-135M-Instruct")   # or a local folder; quant="none" for full precision
    layers = inject_stacks(model)                              # exactly the decoder's q k v o gate up down

How it loads (../shared/spec/scale-notes.md has what was checked on these machines):

- NF4 with double quantization through `bitsandbytes`, bf16 compute on a GPU and fp32 on the CPU (the CPU
  has no bf16 hardware: bf16 there is tens of times slower). On the CPU every non-quantized part is loaded in
  fp32 too: left in bf16, fp32 adapters meet bf16 activations and fail.
- `Gemma3ForConditionalGeneration` (Gemma 3 12B IT) keeps its vision tower and projector out of the 4-bit
  conversion; and the injection only ever looks inside the language model (`model.get_decoder()`), so the
  vision tower's own q/k/v projections are never wrapped.
- Every parameter is frozen: the base never trains, only the stacks added to it do.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from ministacks.stacks.layer import StackedLinear, stacked_layers
from ministacks.stacks.layer import inject_stacks as wrap_projections

# a decoder layer's projections, relative to the decoder (LlamaModel, Gemma3TextModel): layers.N.self_attn.q_proj, ...
PROJECTION_PATH = re.compile(r"^layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$")
# what stays in full precision in a Gemma 3 vision-language model: a custom skip list replaces the default,
# so the LM head is named too (transformers matches these from the start of a module's full name)
GEMMA3_SKIP = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


def compute_dtype(device: str) -> torch.dtype:
    """bf16 on a GPU (the paper's), fp32 on the CPU."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def quantization_config(model_type: str, device: str):
    """The NF4 BitsAndBytesConfig for a base of this `model_type` (config.json's) on `device`."""
    from transformers import BitsAndBytesConfig

    skip = GEMMA3_SKIP if model_type == "gemma3" else None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype(device), llm_int8_skip_modules=skip)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_base(name_or_path: str | Path, quant: str = "nf4", device: str | None = None) -> nn.Module:
    """A frozen pretrained causal LM from a hub id or a local folder, in eval mode.

    quant "nf4" (default, the paper's) or "none" (the checkpoint's weights in the compute dtype). A hub id
    needs the hub, or a copy of it in the local cache: offline, a clear error says so."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if quant not in ("nf4", "none"):
        raise ValueError(f"quant must be 'nf4' or 'none', not {quant!r}")
    device = device or default_device()
    try:
        config = AutoConfig.from_pretrained(str(name_or_path))
    except OSError as e:
        raise FileNotFoundError(
            f"cannot load the base {name_or_path!r}: {e}\nA hub id needs the Hugging Face hub (or its copy in the "
            "local cache); a local folder needs config.json and the weights.") from None
    kwargs = {"dtype": compute_dtype(device), "device_map": {"": device}}
    if quant == "nf4":
        kwargs["quantization_config"] = quantization_config(config.model_type, device)
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
    for p in model.parameters():
        p.requires_grad_(False)
    if quant == "nf4":
        keep_differentiable(model)
    return model.eval()


def keep_differentiable(model: nn.Module) -> int:
    """Turn off bitsandbytes' CPU inference repacking in every 4-bit layer; return how many layers.

    bitsandbytes 0.50, on a CPU with AVX512-BF16, repacks a 4-bit weight into its inference kernel's layout
    at the first eval-mode forward whose input needs no gradient — a validation pass — and keeps it so. From
    then on every forward of that layer, training ones included, runs a kernel with no autograd formula:
    no gradient reaches the layer's input (measured: `x.grad` stays None), so the stacks of every earlier
    layer would train without the gradient through the base, silently. Its `state_dict()` packs the weight
    back, and the next forward repacks it (the layer's output and the base's fingerprint change). Kept in
    the layout it was loaded in, the layer dequantizes and multiplies, with gradients, in every mode."""
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes' Linear4bit
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def language_model(model: nn.Module) -> nn.Module:
    """The decoder whose layers hold the projections: `get_decoder()` of a causal LM (LlamaModel), of a
    Gemma 3 vision-language model (its Gemma3TextModel), or the model itself if it is a bare decoder."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    if decoder is None or not hasattr(decoder, "layers"):
        raise TypeError(f"cannot find the decoder layers of a {type(model).__name__}")
    return decoder


def inject_stacks(model: nn.Module) -> list[StackedLinear]:
    """Freeze `model` and wrap exactly its language model's q, k, v, o, gate, up and down projections (every
    decoder layer's) with StackedLinear, in place; return the wrapped layers. Nothing outside the decoder is
    touched (a vision tower's projections included), and calling it twice wraps nothing twice."""
    for p in model.parameters():
        p.requires_grad_(False)
    decoder = language_model(model)
    wanted = {name for name, _ in decoder.named_modules() if PROJECTION_PATH.match(name)}
    if not wanted:
        raise ValueError(f"no q/k/v/o/gate/up/down projection under {type(decoder).__name__}.layers")
    names = {name.split(".")[-1] for name in wanted}
    wrap_projections(decoder, tuple(sorted(names)))
    layers = list(stacked_layers(model))
    paths = {name for name, m in decoder.named_modules() if isinstance(m, StackedLinear)}
    if paths != wanted:  # a module of the same name elsewhere in the decoder was wrapped too, or one was missed
        raise RuntimeError(f"wrapped {sorted(paths ^ wanted)[:4]} ... against the projections expected")
    return layers
