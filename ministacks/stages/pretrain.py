"""`pretrain`: the base model, from random initialisation, that every later stage freezes.

    data        the five domain corpora and the general corpus (built once, cached; stages/data.py)
    tokenizer   byte-level BPE trained on the general corpus (cached by its settings)
    pretrain    lm/pretrain.py's loop, resumable after a kill from its last checkpoint
    samples     a few greedy continuations per domain: what the base "knows" before any stack
    -> OUT/base/, OUT/tokenizer.json, OUT/pretrain.json, OUT/pretrain_loss.png

`ensure_base` is how every later stage starts: it pretrains first if the folder has no base yet.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..data import DOMAINS, Example, general_corpus, load_split, raw_text
from ..io import atomic_write_json
from ..lm.base import has_base
from ..lm.model import Transformer
from ..lm.pretrain import pretrain
from ..lm.tokenizer import Tokenizer, train_or_load_tokenizer
from ..presets import Preset, get_preset, with_vocab
from ..report.plots import plot_pretrain
from .common import add_preset_args, writable_folder
from .data import stage_data

HELP = "pretrain the base model from random initialisation"


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
            # keep the prompt's end when it is long: prompt and continuation must fit in the context
            ids = tok.encode(prompt, bos=True)[-(preset.model.max_seq_len - cfg.sample_tokens) :]
            out = model.generate(
                torch.tensor([ids]), cfg.sample_tokens, repetition_penalty=cfg.repetition_penalty, eos_id=tok.eos_id
            )
            samples[domain].append({"prompt": prompt, "completion": tok.decode(out[0, len(ids) :].tolist())})
    return samples


def stage_pretrain(preset: Preset, out: str | Path, progress: bool = True) -> dict:
    """Build data, train the tokenizer, pretrain (or resume) the base; write pretrain.json and the plot."""
    out = Path(out)
    data_stats = stage_data(preset, progress=progress)  # cached after the first run: seconds
    # the tokenizer learns its merges from the general corpus only, never from a domain's test split
    tok = base_tokenizer(preset)
    preset = with_vocab(preset, tok.vocab_size)  # the model's embedding has one row per trained token
    # the corpus pretraining reads: the tokenizer's raw-text corpus, with a share of it in the template
    docs = general_corpus(preset.data, template_share=preset.pretrain.template_share)
    result = pretrain(preset.model, preset.pretrain, tok, docs, out, progress=progress)
    summary = {
        "preset": preset.name,
        **result.summary,
        # what the base continues before any stack exists: the report shows these beside the losses
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


def ensure_base(preset: Preset, out: Path, progress: bool) -> None:
    """Pretrain into `out` first if it has no base: every stage after pretraining can start from nothing.
    A folder whose base is a pretrained model (OUT/base/pretrained.json, scale/model.py) has one."""
    if not has_base(out):
        stage_pretrain(preset, out, progress=progress)


def add_args(p) -> None:
    add_preset_args(p, "runs/pretrain")


def main(args) -> int:
    writable_folder(args.out)
    s = stage_pretrain(get_preset(args.preset), args.out, progress=not args.no_progress)
    print(f"validation loss {s['val_loss']:.3f} nats/token (unigram entropy {s['unigram_entropy']:.3f}), "
          f"{s['tokens_per_second']:,.0f} tokens/s, {s['params']:,} params")
    print(f"wrote {Path(args.out) / 'pretrain.json'} and {Path(args.out) / 'pretrain_loss.png'}")
    return 0
