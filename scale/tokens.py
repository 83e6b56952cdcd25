"""A pretrained base's own tokenizer behind ministacks' tokenizer interface, so that ministacks' data code (the
examples' encoding, packing, validation sets) runs unchanged on a Hugging Face base.

How the paper's Alpaca template meets a base's chat template: as in the paper, which trained TinyLlama and
Gemma 3 IT on Alpaca-formatted text, an example is the Alpaca text itself (docs/brainstacks.md §10), not
wrapped in the base's chat turns. It starts as the base's tokenizer starts any text (`<s>` for Llama, `<bos>`
for Gemma, nothing for SmolLM2, whose `<|im_start|>` opens a chat turn rather than a document), and the
response ends with the base's end-of-sequence token (SmolLM2's `<|im_end|>`), where an instruct model stops.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence


class PretrainedTokenizer:
    """ministacks.lm.tokenizer.Tokenizer's interface over a transformers tokenizer: encode(text, bos, eos),
    encode_batch, decode, pad_id, bos_id, eos_id, vocab_size, fingerprint()."""

    def __init__(self, hf):
        self.hf = hf
        if hf.eos_token_id is None:
            raise ValueError(f"{type(hf).__name__} has no end-of-sequence token: a response could not end")
        self.eos_id = int(hf.eos_token_id)
        self.pad_id = int(hf.pad_token_id) if hf.pad_token_id is not None else self.eos_id  # padding is never scored
        # what the tokenizer itself puts before a text: the document start, the way the base was trained
        plain = hf("x", add_special_tokens=False).input_ids
        full = hf("x", add_special_tokens=True).input_ids
        self.start = full[: len(full) - len(plain)] if full[-len(plain):] == plain else []
        self.bos_id = self.start[0] if self.start else None

    @classmethod
    def from_pretrained(cls, name_or_path) -> PretrainedTokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(name_or_path)))

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def fingerprint(self) -> str:
        """A short hash of the vocabulary (and merges where the tokenizer has a `tokenizers` backend)."""
        backend = getattr(self.hf, "backend_tokenizer", None)
        text = backend.to_str() if backend is not None else json.dumps(sorted(self.hf.get_vocab().items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.hf(text, add_special_tokens=False).input_ids
        return (list(self.start) if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        return [self.encode(t, bos, eos) for t in texts]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)
