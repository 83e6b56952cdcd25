"""A tiny random Hugging Face base, built from an in-code config, for running every scale/ script end to end in
seconds (`--tiny`, and the tests). Nothing is downloaded: the tokenizer is a ministacks BPE trained on the
embedded general corpus, handed to transformers as a `PreTrainedTokenizerFast`, and the model a random
`LlamaForCausalLM` (or `Gemma3ForCausalLM`) of that vocabulary, saved as a plain checkpoint (safetensors)
beside its tokenizer — a folder `load_base` reads like any pretrained one. Its numbers mean nothing; that the
scripts run through the same code path a real base takes is what it is for.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ministacks.data import DataConfig, general_corpus
from ministacks.io import atomic_write_text
from ministacks.lm.tokenizer import BOS, EOS, PAD, Tokenizer

# hidden 64: bitsandbytes' CPU 4-bit matmul fails on projections of 512 weights (hidden 32, k/v 16 wide)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=256)
DONE = "TINY"  # written last: a folder without it is rebuilt


def tiny_base(folder: str | Path, kind: str = "llama", vocab_size: int = 512, data: DataConfig | None = None,
              seed: int = 0) -> Path:
    """A tiny random base of `kind` ("llama" or "gemma3_text") in `folder` (built once), with its tokenizer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    if (folder / DONE).is_file():
        return folder
    docs = general_corpus(data or DataConfig(max_examples=600, n_val=40, n_test=40))
    bpe = Tokenizer.train(docs[:2000], vocab_size=vocab_size)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=bpe.hf, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    common = {**TEXT, "vocab_size": len(hf_tok), "bos_token_id": hf_tok.bos_token_id,
              "eos_token_id": hf_tok.eos_token_id, "pad_token_id": hf_tok.pad_token_id}
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "gemma3_text":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, sliding_window=64))
    else:
        raise ValueError(f"unknown tiny base {kind!r}; choose 'llama' or 'gemma3_text'")
    model.save_pretrained(folder, safe_serialization=True)
    hf_tok.save_pretrained(folder)
    atomic_write_text(folder / DONE, f"{kind} {seed}\n")
    return folder
