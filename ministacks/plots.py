"""Figures for the report: plain matplotlib (Agg backend, so it runs without a screen)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _smooth(values: list[float], k: int) -> list[float]:
    """Trailing moving average: raw per-step losses are too noisy to read."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_pretrain(summary: dict, path: str | Path) -> Path:
    """Train (smoothed) and validation loss against step, with the unigram-entropy baseline."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if summary["train_curve"]:
        steps, losses = zip(*summary["train_curve"])
        ax.plot(steps, _smooth(list(losses), 10), lw=1, alpha=0.7, label="train (10-step mean)")
    vs, vl = zip(*summary["val_curve"])
    ax.plot(vs, vl, "o-", lw=2, ms=4, label="validation")
    ax.axhline(summary["unigram_entropy"], color="gray", ls="--", lw=1,
               label=f"unigram entropy {summary['unigram_entropy']:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"Pretraining from random init — {summary['params'] / 1e6:.2f}M params, vocab {summary['vocab_size']}")
    ax.set_ylim(0, max(vl[0], summary["unigram_entropy"]) * 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
