"""The stages a run goes through, each a function from (preset, run folder) to a JSON summary.

Every stage is resumable: it reads what earlier stages left in the run folder and picks up its own
checkpoints. `demo` runs them in order and writes `report.md` (see report.py).

    data      build (or read from cache) the five domain corpora and the general corpus
    pretrain  train the BPE tokenizer and the base model from random init   -> pretrain.json
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from .data import DOMAINS, Example, build_all, general_corpus, load_split, raw_text
from .io import atomic_write_json
from .model import Transformer
from .plots import plot_pretrain
from .presets import Preset, with_vocab
from .pretrain import pretrain
from .tokenizer import Tokenizer, train_or_load_tokenizer


def stage_data(preset: Preset, progress: bool = True) -> dict:
    return build_all(preset.data, progress=progress)


def base_tokenizer(preset: Preset) -> Tokenizer:
    """The preset's BPE tokenizer, trained on the general corpus (cached)."""
    return train_or_load_tokenizer(general_corpus(preset.data), preset.vocab_size)


def sample_prompt(ex: Example) -> str:
    """What a raw-text base model is given to continue: a held-out example's document form, up to its response."""
    return raw_text(replace(ex, response="")) + "\n"


@torch.no_grad()
def domain_samples(model: Transformer, tok: Tokenizer, preset: Preset) -> dict[str, list[dict]]:
    """Greedy continuations (repetition penalty as in the paper) of held-out prompts, per domain."""
    cfg = preset.pretrain
    samples: dict[str, list[dict]] = {}
    for domain in DOMAINS:
        samples[domain] = []
        for ex in load_split(domain, "test", preset.data)[: cfg.samples_per_domain]:
            prompt = sample_prompt(ex)
            ids = tok.encode(prompt, bos=True)[-(preset.model.max_seq_len - cfg.sample_tokens) :]
            out = model.generate(
                torch.tensor([ids]), cfg.sample_tokens, repetition_penalty=cfg.repetition_penalty, eos_id=tok.eos_id
            )
            samples[domain].append({"prompt": prompt, "completion": tok.decode(out[0, len(ids) :].tolist())})
    return samples


def stage_pretrain(preset: Preset, out: str | Path, progress: bool = True) -> dict:
    """Build data, train the tokenizer, pretrain (or resume) the base; write pretrain.json and the plot."""
    out = Path(out)
    data_stats = stage_data(preset, progress=progress)
    tok = base_tokenizer(preset)
    preset = with_vocab(preset, tok.vocab_size)
    result = pretrain(preset.model, preset.pretrain, tok, general_corpus(preset.data), out, progress=progress)
    summary = {
        "preset": preset.name,
        **result.summary,
        "samples": domain_samples(result.model, tok, preset),
        "data": data_stats,
        "tokenizer": tokenizer_stats(tok, preset),
    }
    plot_pretrain(summary, out / "pretrain_loss.png")
    atomic_write_json(out / "pretrain.json", summary)
    return summary


def tokenizer_stats(tok: Tokenizer, preset: Preset) -> dict:
    """Characters per token on each domain's validation text: how well the BPE compresses each domain."""
    stats = {"vocab_size": tok.vocab_size, "chars_per_token": {}}
    for domain in DOMAINS:
        texts = [ex.text() for ex in load_split(domain, "val", preset.data)]
        n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
        stats["chars_per_token"][domain] = sum(map(len, texts)) / max(1, n_tokens)
    return stats
