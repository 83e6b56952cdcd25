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


def plot_compare(result: dict, path: str | Path) -> Path:
    """Like the paper's Figure 2: MoE-LoRA and single-LoRA validation curves, and the gap at each checkpoint."""
    path = Path(path)
    fig, (ax, gap_ax) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for kind, label in (("moe", "MoE-LoRA (4 × r16, top-2)"), ("lora", "single LoRA (r64)")):
        steps, losses = zip(*result[kind]["val_curve"])
        ax.plot(steps, losses, "o-", ms=4, label=f"{label}, {result[kind]['params'] / 1e6:.2f}M params")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{result['domain']}: MoE-LoRA vs parameter-matched LoRA")
    ax.grid(alpha=0.3)
    ax.legend()
    moe, lora = dict(map(tuple, result["moe"]["val_curve"])), dict(map(tuple, result["lora"]["val_curve"]))
    steps = [s for s in moe if s in lora and s > 0]
    gaps = [lora[s] - moe[s] for s in steps]
    gap_ax.bar([str(int(s)) for s in steps], gaps, color=["tab:green" if g > 0 else "tab:red" for g in gaps])
    gap_ax.axhline(0, color="black", lw=0.8)
    gap_ax.set_xlabel("step")
    gap_ax.set_ylabel("LoRA − MoE (positive: MoE ahead)")
    gap_ax.set_title("gap at each checkpoint")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_boost(result: dict, path: str | Path) -> Path:
    """Like the paper's Figure 3: validation loss through the boosting rounds, one colour per round."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    offset = 0
    for i, r in enumerate(result["rounds"]):
        steps, losses = zip(*r["val_curve"])
        ax.plot([offset + s for s in steps], losses, "o-", ms=4, label=f"round {i + 1}: best {r['best_loss']:.4f}")
        ax.axvline(offset, color="gray", lw=0.6, ls=":")
        offset += r["steps_run"]
    ax.set_xlabel("cumulative step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"Residual boosting on {result['domain']} (stop: gain < {result['min_improvement']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
