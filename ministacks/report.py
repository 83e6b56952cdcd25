"""`report.md`: what a run did, in numbers, figures and samples. Each stage contributes a section."""

from __future__ import annotations

from pathlib import Path

from .io import atomic_write_text


def _fence(text: str) -> str:
    # a completion may contain backticks; a longer fence keeps the markdown intact
    return "````text\n" + text.rstrip() + "\n````"


def data_section(stats: dict) -> str:
    rows = ["| domain | train | val | test | chars |", "|---|---:|---:|---:|---:|"]
    for domain, s in stats.items():
        if isinstance(s, dict) and "train" in s:
            rows.append(f"| {domain} | {s['train']:,} | {s['val']:,} | {s['test']:,} | {s.get('chars', 0):,} |")
    general = stats.get("general", {})
    lines = ["## Data", "", *rows, ""]
    if general:
        lines.append(f"General pretraining corpus: {general.get('docs', 0):,} documents, {general.get('chars', 0):,} "
                     "characters, from training examples only (no validation or test example of any domain).")
    return "\n".join(lines) + "\n"


def pretrain_section(s: dict) -> str:
    gap = s["unigram_entropy"] - s["val_loss"]
    lines = [
        "## Pretraining from random initialisation",
        "",
        f"- model: {s['params']:,} parameters, vocabulary {s['vocab_size']:,} "
        f"({s['config']['model']['n_layer']} layers, d={s['config']['model']['d_model']})",
        f"- tokens seen: {s['tokens_seen']:,} at {s['tokens_per_second']:,.0f} tokens/s ({s['train_seconds']:.0f} s of training)",
        f"- **validation loss {s['val_loss']:.3f} nats/token** vs the corpus's unigram entropy "
        f"{s['unigram_entropy']:.3f} (a model that ignores context): {gap:+.3f} nats learned from context",
        "",
        "![pretraining loss](pretrain_loss.png)",
        "",
        "Tokenizer: characters per token on each domain's validation text — "
        + ", ".join(f"{d} {v:.2f}" for d, v in s["tokenizer"]["chars_per_token"].items()),
        "",
        "### Greedy samples per domain (held-out prompts; repetition penalty 1.2)",
        "",
    ]
    for domain, items in s["samples"].items():
        for item in items:
            lines += [f"**{domain}** — prompt, then the base model's continuation:", "", _fence(item["prompt"]),
                      "", _fence(item["completion"]), ""]
    return "\n".join(lines)


def write_report(out: str | Path, sections: list[str], title: str) -> Path:
    path = Path(out) / "report.md"
    atomic_write_text(path, f"# {title}\n\n" + "\n".join(sections))
    return path
