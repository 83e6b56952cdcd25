"""Figures for the report: plain matplotlib (saved to files; without a screen matplotlib falls back to Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


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
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


def _heat(ax, matrix, rows, cols, title, cmap="viridis", center=False):
    import numpy as np

    m = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    if center:
        lim = np.nanmax(np.abs(m)) or 1.0
        im = ax.imshow(m, cmap=cmap, vmin=-lim, vmax=lim)
    else:
        im = ax.imshow(m, cmap=cmap)
    ax.set_xticks(range(len(cols)), cols, rotation=30)
    ax.set_yticks(range(len(rows)), rows)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.3f}", ha="center", va="center", fontsize=8,
                        color="white" if not center else "black")
    ax.set_title(title)
    plt.colorbar(im, ax=ax, fraction=0.046)


def plot_forgetting(runs: dict[str, dict], path: str | Path) -> Path:
    """Like the paper's Figures 4–6: forgetting matrices (rows: after training, cols: domain evaluated),
    one per run, and their difference when there are two."""
    path = Path(path)
    names = list(runs)
    panels = len(names) + (1 if len(names) == 2 else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.4), dpi=110, squeeze=False)
    for ax, name in zip(axes[0], names):
        f = runs[name]
        _heat(ax, f["matrix"], [f"after {d}" for d in f["domains"]], f["domains"], f"{name}: ungated val loss")
    if len(names) == 2:
        a, b = (runs[n]["matrix"] for n in names)
        diff = [[None if x is None or y is None else y - x for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]
        f = runs[names[0]]
        _heat(axes[0][-1], diff, [f"after {d}" for d in f["domains"]], f["domains"],
              f"{names[1]} − {names[0]} (negative: {names[1]} better)", cmap="RdBu_r", center=True)
    return _save(fig, path)


def plot_subspaces(similarity, domains: list[str], spectra: dict[str, list[float]], orthogonality: dict[str, float],
                   path: str | Path) -> Path:
    """Like the paper's Figures 8–10: cross-domain similarity of the stacks' principal output subspaces,
    singular-value spectra of the deltas, and orthogonality per projection type."""
    path = Path(path)
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.4), dpi=110)
    _heat(a, [[float(v) for v in row] for row in similarity], domains, domains,
          "subspace similarity (max cosine, mean over layers)", cmap="magma")
    for name, s in spectra.items():
        b.semilogy(range(1, len(s) + 1), s, "o-", ms=3, label=name)
    b.set_xlabel("singular value index")
    b.set_ylabel("singular value of the frozen deltas")
    b.set_title("spectra (mean over projections)")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    names = list(orthogonality)
    c.bar(names, [orthogonality[n] for n in names])
    c.set_ylim(0, 1.05)
    c.set_ylabel("1 − ‖Vᵀδ‖/‖δ‖")
    c.set_title("new stacks' orthogonality to earlier directions")
    c.tick_params(axis="x", rotation=30)
    return _save(fig, path)


def _share_matrix(per_domain: dict[str, dict], domains: list[str], top: int = 6) -> tuple[list[str], list[list[float]]]:
    """Rows: each domain's prompts; columns: the combinations that win most often overall."""
    totals: dict[str, float] = {}
    for d in domains:
        for c, s in per_domain[d]["shares"].items():
            totals[c] = totals.get(c, 0.0) + s
    cols = [c for c, _ in sorted(totals.items(), key=lambda kv: -kv[1])[:top]]
    return cols, [[per_domain[d]["shares"].get(c, 0.0) for c in cols] for d in domains]


def plot_router(result: dict, path: str | Path) -> Path:
    """The router's training curves, the oracle's winning combinations per domain, and the routes the
    trained router switches on for each domain's held-out prompts."""
    path = Path(path)
    domains = result["domains"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(17, 4.6), dpi=110)
    h = result["history"]
    epochs = [r["epoch"] for r in h]
    a.plot(epochs, [r["train_loss"] for r in h], "o-", label="train loss (BCE + margin)")
    a.plot(epochs, [r["bce"] for r in h], "o-", label="val BCE")
    a.plot(epochs, [r["single_top1"] for r in h], "s--", label="val single top-1 (targets)")
    a.plot(epochs, [r["mixed_set_match"] for r in h], "s--", label="val mixed set match (targets)")
    a.plot(epochs, [r["label_top1"] for r in h], ":", color="grey", label="val top-1 against domain labels")
    a.axvline(result["best_epoch"], color="grey", ls=":", label="kept epoch")
    a.set_xlabel("epoch")
    a.set_title("router training")
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    cols, m = _share_matrix(result["oracle"], domains)
    _heat(b, m, [f"{d} prompts" for d in domains], cols, "oracle: share of each winning combination", cmap="Blues")
    cols, m = _share_matrix(result["routes"], domains)
    _heat(c, m, [f"{d} prompts" for d in domains], cols, "router: stacks switched on (held-out prompts)", cmap="Greens")
    return _save(fig, path)


def plot_eval(result: dict, path: str | Path) -> Path:
    """Loss and task accuracy per domain in the three modes (base, ungated, routed)."""
    import numpy as np

    path = Path(path)
    domains, modes = result["domains"], result["modes"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), dpi=110)
    x = np.arange(len(domains))
    width = 0.8 / len(modes)
    for k, metric in enumerate(("loss", "accuracy")):
        ax = axes[k]
        for i, mode in enumerate(modes):
            vals = [result["results"].get(f"{mode}/{d}", {}).get(metric) for d in domains]
            ax.bar(x + (i - (len(modes) - 1) / 2) * width, [np.nan if v is None else v for v in vals], width, label=mode)
        ax.set_xticks(x, domains)
        ax.set_title("test loss (lower is better)" if metric == "loss"
                     else "task accuracy (code: HumanEval pass@1; chat: nothing checkable)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
