"""Figures for the report: plain matplotlib (saved to files; without a screen matplotlib falls back to Agg).

Each stage draws its figure from the same dict it writes as JSON, next to that JSON; report.md links it
(report.py). §N is docs/brainstacks.md §N.

    plot_pretrain     OUT/pretrain_loss.png  train and validation loss of the base against the unigram
                                             entropy line: the base should end well below it
    plot_compare      OUT/compare.png        Exp 1 (§9, the paper's Figure 2): both arms' validation
                                             curves, and LoRA − MoE per checkpoint (green: MoE ahead)
    plot_boost        OUT/boost.png          residual boosting (§3, Figure 3): one curve per round on one
                                             step axis; does round 2 reach below round 1's best?
    plot_forgetting   OUT/forgetting.png     forgetting matrices (§4, §5, Figures 4–6) and with − without
                                             null-space: blue below the diagonal is where projection helped
    plot_subspaces    OUT/subspaces.png      the stacks' output subspaces (Figures 8–10): overlap between
                                             domains, how many directions a stack uses, leakage into the
                                             protected ones
    plot_router       RUN/router.png         the router's training curves, the oracle's winning
                                             combinations and the router's routes (§6): do the two match?
    plot_eval         RUN/eval.png           test loss and accuracy in base, ungated and routed mode (§7)

OUT is the demo's folder; RUN is the continual run the router and the evaluation work on (OUT/nullspace).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import matplotlib.pyplot as plt

from ..evaluation.tasks import wilson_interval
from ..stacks.layer import AdapterConfig


def _save(fig, path: Path) -> Path:
    """Lay out, write `path` (its format from the suffix, at the figure's dpi) and close the figure."""
    fig.tight_layout()
    fig.savefig(path)
    # pyplot keeps every figure alive until closed: a run draws several, and a notebook many more
    plt.close(fig)
    return path


def _smooth(values: list[float], k: int) -> list[float]:
    """Trailing moving average: raw per-step losses are too noisy to read.

    out[i] = mean(values[max(0, i − k + 1) : i + 1]): the first k − 1 points average what there is so far,
    so the curve starts at step 1 instead of being padded or cut. A running sum keeps it O(n)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]  # the value leaving the window
        out.append(acc / min(i + 1, k))
    return out


def plot_pretrain(summary: dict, path: str | Path) -> Path:
    """Train (smoothed) and validation loss against step, with the unigram-entropy baseline.

    `summary`: pretrain.json's dict (lm/pretrain.py): "train_curve" [[step, batch loss]], "val_curve"
    [[step, loss]], "unigram_entropy", "params", "vocab_size". Read: the validation curve should fall
    well below the dashed line, the loss of a model that ignores context; a train curve well below it
    is the base overfitting its corpus."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if summary["train_curve"]:  # empty only when no step ran
        steps, losses = zip(*summary["train_curve"])
        # one batch's loss jumps with its documents; a 10-step mean shows the trend under the noise
        ax.plot(steps, _smooth(list(losses), 10), lw=1, alpha=0.7, label="train (10-step mean)")
    vs, vl = zip(*summary["val_curve"])
    ax.plot(vs, vl, "o-", lw=2, ms=4, label="validation")
    ax.axhline(summary["unigram_entropy"], color="gray", ls="--", lw=1,
               label=f"unigram entropy {summary['unigram_entropy']:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"Pretraining from random init — {summary['params'] / 1e6:.2f}M params, "
                 f"vocab {summary['vocab_size']}")
    # from 0, so the drop is seen at its true size; the top holds the step-0 (random init) loss and the line
    ax.set_ylim(0, max(vl[0], summary["unigram_entropy"]) * 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)  # stages/pretrain.py draws this before pretrain.json
    return _save(fig, path)


def recorded_adapter(compare: dict) -> dict:
    """The adapter shape Exp 1 ran with (compare.json's "adapter"); one written before it was recorded
    ran the paper's literal AdapterConfig()."""
    return compare.get("adapter", asdict(AdapterConfig()))


def plot_compare(result: dict, path: str | Path) -> Path:
    """Like the paper's Figure 2: MoE-LoRA and single-LoRA validation curves, and the gap at each checkpoint.

    `result`: compare.json's dict ("moe" and "lora", each with "val_curve" [[step, loss]] and "params").
    Right panel: LoRA − MoE at every step both arms evaluated, so a green bar (positive) is a checkpoint
    where MoE-LoRA is ahead; the paper has MoE ahead at all 8 (§9)."""
    path = Path(path)
    fig, (ax, gap_ax) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    a = recorded_adapter(result)
    for kind, label in (("moe", f"MoE-LoRA ({a['n_experts']} × r{a['r']}, top-{a['top_k']})"),
                        ("lora", f"single LoRA (r{a['lora_r']})")):
        steps, losses = zip(*result[kind]["val_curve"])
        # the parameter counts in the legend show the match the comparison rests on
        ax.plot(steps, losses, "o-", ms=4, label=f"{label}, {result[kind]['params'] / 1e6:.2f}M params")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{result['domain']}: MoE-LoRA vs parameter-matched LoRA")
    ax.grid(alpha=0.3)
    ax.legend()
    # JSON gives [step, loss] lists: as {step: loss}, the two curves are matched by step
    moe, lora = dict(map(tuple, result["moe"]["val_curve"])), dict(map(tuple, result["lora"]["val_curve"]))
    # step 0 is left out: both arms are the zero-init identity there, so the gap is 0 by construction
    steps = [s for s in moe if s in lora and s > 0]
    gaps = [lora[s] - moe[s] for s in steps]
    # steps as labels: evenly spaced bars, whatever the evaluation interval
    gap_ax.bar([str(int(s)) for s in steps], gaps, color=["tab:green" if g > 0 else "tab:red" for g in gaps])
    gap_ax.axhline(0, color="black", lw=0.8)
    gap_ax.set_xlabel("step")
    gap_ax.set_ylabel("LoRA − MoE (positive: MoE ahead)")
    gap_ax.set_title("gap at each checkpoint")
    return _save(fig, path)


def plot_boost(result: dict, path: str | Path) -> Path:
    """Like the paper's Figure 3: validation loss through the boosting rounds, one colour per round.

    `result`: boost.json's dict, "rounds" each with "val_curve" [[step, loss]] (step 0: the loss before
    the round), "steps_run" and "best_loss". The rounds are laid end to end on one cumulative step axis,
    a dotted line where each begins; the legend gives each round's best, which round 2 should beat."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    offset = 0
    for i, r in enumerate(result["rounds"]):
        steps, losses = zip(*r["val_curve"])
        # a round starts from the best snapshot of the one before, not its last evaluation: a step down at
        # a boundary is that snapshot being restored
        ax.plot([offset + s for s in steps], losses, "o-", ms=4, label=f"round {i + 1}: best {r['best_loss']:.4f}")
        ax.axvline(offset, color="gray", lw=0.6, ls=":")
        offset += r["steps_run"]  # a round the guard stopped early takes only the steps it ran
    control = result.get("control")
    if control is not None:  # one stack for as many steps as all the rounds: what boosting must beat
        steps, losses = zip(*control["val_curve"])
        ax.plot(steps, losses, "k--", lw=1, label=f"control, one stack: best {control['best_loss']:.4f}")
    ax.set_xlabel("cumulative step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"Residual boosting on {result['domain']} (stop: gain < {result['min_improvement']})")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _heat(ax, matrix, rows, cols, title, cmap="viridis", center=False):
    """`matrix` (lists; None = not measured) as an annotated heat map on `ax`, with a colour bar.

    center=True: a diverging map with limits ±max|v|, for differences: zero sits at the map's middle,
    so the colour's hue is the sign and its depth the size, a gain and a loss of one size equally deep."""
    import numpy as np

    # None becomes NaN, which imshow leaves blank: a cell not measured (a forgetting matrix's upper
    # triangle) must not read as a 0
    m = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    if center:
        lim = np.nanmax(np.abs(m)) or 1.0  # an all-zero difference would give vmin = vmax
        im = ax.imshow(m, cmap=cmap, vmin=-lim, vmax=lim)
    else:
        im = ax.imshow(m, cmap=cmap)
    ax.set_xticks(range(len(cols)), cols, rotation=30)
    ax.set_yticks(range(len(rows)), rows)
    # every value written in its cell, to 3 decimals: the colours alone do not give numbers
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if not np.isnan(m[i, j]):
                # black on the diverging map, whose middle (small differences) is near white
                ax.text(j, i, f"{m[i, j]:.3f}", ha="center", va="center", fontsize=8,
                        color="white" if not center else "black")
    ax.set_title(title)
    plt.colorbar(im, ax=ax, fraction=0.046)  # a narrow bar beside the image


def plot_forgetting(runs: dict[str, dict], path: str | Path) -> Path:
    """Like the paper's Figures 4–6: forgetting matrices (rows: after training, cols: domain evaluated),
    one per run, and their difference when there are two.

    `runs`: forgetting.json's "runs", {name: {"domains", "matrix"}}, in the order stages/continual.py
    trains them ("without null-space", then "with null-space"), so the last panel is with − without.
    Read below the diagonal: an earlier domain's loss after later ones trained, where forgetting shows."""
    path = Path(path)
    names = list(runs)
    panels = len(names) + (1 if len(names) == 2 else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.4), dpi=110, squeeze=False)
    for ax, name in zip(axes[0], names):
        f = runs[name]
        _heat(ax, f["matrix"], [f"after {d}" for d in f["domains"]], f["domains"], f"{name}: ungated val loss")
    if len(names) == 2:
        a, b = (runs[n]["matrix"] for n in names)
        # second − first, cell by cell; a cell either run did not measure stays blank
        diff = [[None if x is None or y is None else y - x for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]
        f = runs[names[0]]  # both runs train the same domains in the same order: one set of labels
        # a centred red–blue map: blue (negative) is a loss the second run lowered
        _heat(axes[0][-1], diff, [f"after {d}" for d in f["domains"]], f["domains"],
              f"{names[1]} − {names[0]} (negative: {names[1]} better)", cmap="RdBu_r", center=True)
    return _save(fig, path)


def plot_subspaces(similarity, domains: list[str], spectra: dict[str, list[float]], orthogonality: dict[str, float],
                   path: str | Path) -> Path:
    """Like the paper's Figures 8–10: cross-domain similarity of the stacks' principal output subspaces,
    singular-value spectra of the deltas, and orthogonality per projection type.

    The arguments are forgetting.json's "analysis" (stages/continual.py's subspace_analysis):
      similarity     [D, D]: max |cos| between two domains' top-K output directions (the largest singular
                     value of V_aᵀ V_b), mean over layers; 1 on the diagonal, high off it = shared directions
      spectra        {domain: singular values of its frozen deltas D [n, d_out]}, mean over every projection
      orthogonality  {projection type: 1 − ‖δV‖/‖δ‖}, a later domain's delta against the basis it trained
                     with, mean over layers and later domains; 1 = nothing written into protected space"""
    path = Path(path)
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.4), dpi=110)
    _heat(a, [[float(v) for v in row] for row in similarity], domains, domains,
          "subspace similarity (max cosine, mean over layers)", cmap="magma")
    for name, s in spectra.items():
        # log scale: singular values fall by orders of magnitude, and how steeply they fall says how
        # few directions a stack writes into
        b.semilogy(range(1, len(s) + 1), s, "o-", ms=3, label=name)
    b.set_xlabel("singular value index")
    b.set_ylabel("singular value of the frozen deltas")
    b.set_title("spectra (mean over projections)")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    names = list(orthogonality)
    c.bar(names, [orthogonality[n] for n in names])
    c.set_ylim(0, 1.05)  # the whole range, with room to see a bar that reaches 1
    c.set_ylabel("1 − ‖Vᵀδ‖/‖δ‖")
    c.set_title("new stacks' orthogonality to earlier directions")
    c.tick_params(axis="x", rotation=30)
    return _save(fig, path)


def _share_matrix(per_domain: dict[str, dict], domains: list[str], top: int = 6) -> tuple[list[str], list[list[float]]]:
    """Rows: each domain's prompts; columns: the combinations that win most often overall.

    A combination's weight is its share summed over the domains (each domain counts the same, whatever
    its n); the `top` heaviest are kept, so a row need not sum to 1, and a domain with no prompts
    (shares {}) is a row of zeros."""
    totals: dict[str, float] = {}
    for d in domains:
        for c, s in per_domain[d]["shares"].items():
            totals[c] = totals.get(c, 0.0) + s
    # 2^D − 1 combinations (and base) do not fit as readable columns; the heaviest few show the pattern
    cols = [c for c, _ in sorted(totals.items(), key=lambda kv: -kv[1])[:top]]
    return cols, [[per_domain[d]["shares"].get(c, 0.0) for c in cols] for d in domains]


def plot_router(result: dict, path: str | Path) -> Path:
    """The router's training curves, the oracle's winning combinations per domain, and the routes the
    trained router switches on for each domain's held-out prompts.

    `result`: router.json's dict (stages/route.py): "history" (one record per epoch), "best_epoch",
    "oracle" and "routes" ({domain: {"n", "shares"}}). Read the two heat maps together: a router that
    learned its targets switches on what the oracle found best. Each map picks its own six columns."""
    path = Path(path)
    domains = result["domains"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(17, 4.6), dpi=110)
    h = result["history"]
    epochs = [r["epoch"] for r in h]
    # losses and scores share one axis; val BCE and the two dashed scores are what the epoch is chosen by
    a.plot(epochs, [r["train_loss"] for r in h], "o-", label="train loss (BCE + margin)")
    a.plot(epochs, [r["bce"] for r in h], "o-", label="val BCE")
    a.plot(epochs, [r["single_top1"] for r in h], "s--", label="val single top-1 (targets)")
    a.plot(epochs, [r["mixed_set_match"] for r in h], "s--", label="val mixed set match (targets)")
    # against the domain labels, in grey: reported, never used to select (§6)
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
    """Loss, choice accuracy and exact greedy accuracy per domain in every mode (base, ungated, routed, switched).

    `result`: eval.json's dict (stages/evaluate.py), "results" keyed "mode/domain". One group of bars
    per domain, one bar per mode; the loss panel ends with the general held-out text ("general"). A
    value not measured (chat's accuracy, a block not evaluated yet) has no bar; accuracy bars carry their
    95% Wilson interval. Read: where the routed modes' bars stand against base's and ungated's, domain by
    domain (the report's eval_finding counts it)."""
    import numpy as np

    path = Path(path)
    domains, modes = result["domains"], result["modes"]
    general = result.get("general") or {}
    fig, axes = plt.subplots(1, 3, figsize=(19, 4.4), dpi=110)
    width = 0.8 / len(modes)  # a domain's bars fill 80% of its slot: a gap between domains
    for k, metric in enumerate(("loss", "choice", "exact")):
        ax = axes[k]
        groups = domains + (["general"] if metric == "loss" and general else [])
        x = np.arange(len(groups))
        for i, mode in enumerate(modes):
            vals, errs = [], [[], []]
            for d in groups:
                cell = general.get(mode, {}) if d == "general" else result["results"].get(f"{mode}/{d}", {})
                v, lo, hi = np.nan, 0.0, 0.0
                if metric == "loss" and "loss" in cell:
                    v = cell["loss"]
                elif metric != "loss" and cell.get(metric, {}).get("n"):
                    c, n = cell[metric]["correct"], cell[metric]["n"]
                    low, high = wilson_interval(c, n)
                    v, lo, hi = c / n, c / n - low, high - c / n
                vals.append(v)
                errs[0].append(lo)
                errs[1].append(hi)
            # offsets centre the group on the domain's tick; NaN draws no bar
            ax.bar(x + (i - (len(modes) - 1) / 2) * width, vals, width, label=mode,
                   yerr=errs if metric != "loss" else None, capsize=2)
        ax.set_xticks(x, groups)
        ax.set_title({"loss": "test loss (lower is better; general: held-out prose)",
                      "choice": "choice of 4 by mean log-prob, 95% interval",
                      "exact": "exact greedy answer, 95% interval (chat, code: nothing checkable)"}[metric])
        if metric == "choice":
            ax.axhline(0.25, color="grey", lw=0.8, ls="--")  # chance: one of four
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_harness(result: dict, path: str | Path) -> Path:
    """One group of bars per harness task, one bar per mode, each the task's headline metric (harness.json,
    stages/harness_eval.py) with its 95% interval: the paper's mean-log-prob choice (acc_mean) for a
    multiple-choice task, exact_match / pass_at_1 for a generation task. The dashed line is chance for the
    four-way choice tasks. Read: whether the routed bars stand above base's beyond their intervals."""
    import numpy as np

    from ..evaluation.harness_tasks import headline_metric

    path = Path(path)
    tasks, modes = result["tasks"], result["modes"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(tasks) + 2), 4.2), dpi=110)
    width = 0.8 / len(modes)
    x = np.arange(len(tasks))
    for i, mode in enumerate(modes):
        vals, errs = [], [[], []]
        for task in tasks:
            cell = result["results"].get(task, {}).get(mode, {})
            metric = headline_metric(cell)
            v = cell[metric]["value"] if metric and cell[metric]["value"] is not None else np.nan
            low, high = cell[metric]["interval"] if metric else (v, v)
            vals.append(v)
            errs[0].append(0.0 if np.isnan(v) else max(0.0, v - low))
            errs[1].append(0.0 if np.isnan(v) else max(0.0, high - v))
        ax.bar(x + (i - (len(modes) - 1) / 2) * width, vals, width, label=mode, yerr=errs, capsize=2)
    ax.set_xticks(x, [t.replace("ministacks_", "") for t in tasks], rotation=20)
    ax.axhline(0.25, color="grey", lw=0.8, ls="--")  # chance of the four-way choice tasks
    ax.set_ylim(0, 1)
    ax.set_title("lm-evaluation-harness: headline metric per task, 95% interval")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
