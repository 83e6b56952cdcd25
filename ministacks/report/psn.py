"""PSN in the report: OUT/psn.png (v1), OUT/psn_v2.png (v2) and report.md's section (docs/brainstacks.md §8).

    plot_psn     left: per domain, the validation loss before its first stack and after its last, on the
                 random base and on the pretrained one; right: the two forgetting matrices
    plot_psn_v2  per domain, the test loss without any block and with its own block (the oracle gain), and
                 each block's validation curve
    psn_section  the same numbers in tables, one sentence per domain generated from them, each run's greedy
                 answer to one validation prompt per domain beside the reference, and v2's Figure 12
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from .paper import PAPER_PSN
from .plots import _heat, _save

RUNS = (("random", "random base"), ("pretrained", "pretrained base"))


def plot_psn(v1: dict, path: str | Path) -> Path:
    domains = v1["random"]["domains"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    x = range(len(domains))
    for k, (key, label) in enumerate(RUNS):
        r = v1[key]
        shift = -0.2 if k == 0 else 0.2
        axes[0].bar([i + shift for i in x], [r["after"][d] for d in domains], width=0.4, label=f"{label}: after its stacks")
        axes[0].scatter([i + shift for i in x], [r["before"][d] for d in domains], marker="_", s=300, color="black",
                        zorder=3, label="before its first stack" if k == 0 else None)
    axes[0].set_xticks(list(x), domains)
    axes[0].set_ylabel("validation loss (nats per token)")
    axes[0].set_title("PSN v1: each domain's stacks on a random vs a pretrained base")
    axes[0].legend(fontsize=7)
    for ax, (key, label) in zip(axes[1:], RUNS):
        _heat(ax, v1[key]["forgetting"], domains, domains, f"forgetting matrix, {label}")
    return _save(fig, Path(path))


def plot_psn_v2(v2: dict, path: str | Path) -> Path:
    domains = list(v2["oracle"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110)
    x = range(len(domains))
    axes[0].bar([i - 0.2 for i in x], [v2["oracle"][d]["without"] for d in domains], width=0.4, label="no block")
    axes[0].bar([i + 0.2 for i in x], [v2["oracle"][d]["with"] for d in domains], width=0.4, label="its own block")
    axes[0].set_xticks(list(x), domains)
    axes[0].set_ylabel("test loss (nats per token)")
    axes[0].set_title("PSN v2: the oracle gain of each capability block")
    axes[0].legend(fontsize=8)
    for d in domains:
        steps, losses = zip(*v2["blocks"][d]["val_curve"])
        axes[1].plot(steps, losses, "o-", ms=3, label=d)
    axes[1].set_xlabel("block training step")
    axes[1].set_ylabel("validation loss")
    axes[1].set_title("each block's training (earlier blocks off)")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def psn_v2_lines(v2: dict, plot: str | None) -> list[str]:
    low, high = PAPER_PSN["v2"]["oracle_gain_nats"]
    share = v2.get("template_share", 0.0)
    over = ("a base pretrained on general text alone" if not share else
            f"the run's own base (pretrained with {share:.0%} of its domain examples in the Alpaca template; the "
            "paper's v2 base is pretrained on general text alone, and `psn --variant v2` pretrains one)")
    lines = [f"## PSN v2: capability blocks over {over}", "",
             f"The paper: oracle gains of +{low} to +{high} nats per domain; the router 100% top-1 on single-domain "
             "prompts and 100% set match on mixed ones.", "",
             "| domain | test loss, no block | with its own block | oracle gain (nats) | n |", "|---|---:|---:|---:|---:|"]
    for d, o in v2["oracle"].items():
        lines.append(f"| {d} | {o['without']:.3f} | {o['with']:.3f} | {o['gain']:+.3f} | {o['n']} |")
    gains = [o["gain"] for o in v2["oracle"].values()]
    inside = sum(low <= g <= high for g in gains)
    lines += ["", f"Our gains run from {min(gains):+.3f} to {max(gains):+.3f} nats; {inside} of {len(gains)} fall in the "
              f"paper's range (its base and blocks are far larger: a model on TinyStories and ~100M-parameter blocks)."]
    r = v2.get("router")
    if isinstance(r, dict):
        n = r["n_prompts"]
        lines += ["", f"The meta-router over the blocks, on held-out prompts ({n['val']} of {n['single'] + n['mixed']}): "
                  f"single-domain top-1 {r['single_top1']:.0%} and mixed-prompt set match {r['mixed_set_match']:.0%} "
                  f"against the oracle's targets (the paper: 100% and 100%); against the prompts' domain labels "
                  f"{r['label_top1']:.0%} and {r['label_set_match']:.0%}."]
    if v2.get("figure12"):
        f = v2["figure12"]
        lines += ["", f"Figure 12's analogue, a code prompt: `{_one_line(f['prompt'])}`", ""]
        lines += [f"- {name}: `{_one_line(a)}`" for name, a in f["answers"].items()]
        lines.append(f"- reference: `{_one_line(f['reference'])}`")
    if plot:
        lines += ["", f"![PSN v2]({plot})"]
    return lines + [""]


def psn_section(result: dict | None, plot: str | None = "psn.png", plot_v2: str | None = "psn_v2.png") -> str:
    v2 = psn_v2_lines(result["v2"], plot_v2) if result and "v2" in result else []
    lines = ["## PSN v1: Brainstacks from random initialisation", ""]
    if not result or "v1" not in result:
        return "\n".join(lines + ["Not run.", ""] + v2)
    v1 = result["v1"]
    rnd, pre = v1["random"], v1["pretrained"]
    lines += [f"The paper: {PAPER_PSN['v1']}", "",
              "| domain | random base: before → after its stacks | pretrained base: before → after |",
              "|---|---|---|"]
    for d in rnd["domains"]:
        lines.append(f"| {d} | {rnd['before'][d]:.3f} → {rnd['after'][d]:.3f} | {pre['before'][d]:.3f} → {pre['after'][d]:.3f} |")
    lines.append("")
    for d in rnd["domains"]:
        gain_r, gain_p = rnd["before"][d] - rnd["after"][d], pre["before"][d] - pre["after"][d]
        gap = rnd["after"][d] - pre["after"][d]
        lines.append(f"- {d}: the stacks lower the random base's loss by {gain_r:.3f} nats and the pretrained base's "
                     f"by {gain_p:.3f}; the random base ends {abs(gap):.3f} nats "
                     f"{'above' if gap > 0 else 'below'} the pretrained one.")
    lines += ["", "Greedy answers with these domains' stacks on (first validation prompt of each domain):", ""]
    for d in rnd["domains"]:
        s_r, s_p = rnd["samples"][d], pre["samples"][d]
        lines += [f"- **{d}** — prompt: `{_one_line(s_r['prompt'])}`",
                  f"  - random base: `{_one_line(s_r['answer'])}`",
                  f"  - pretrained base: `{_one_line(s_p['answer'])}`",
                  f"  - reference: `{_one_line(s_r['reference'])}`"]
    if plot:
        lines += ["", f"![PSN v1]({plot})"]
    return "\n".join(lines + [""] + v2)


def _one_line(text: str, n: int = 120) -> str:
    text = " ".join(text.split()).replace("`", "'")
    return text if len(text) <= n else text[: n - 1] + "…"
