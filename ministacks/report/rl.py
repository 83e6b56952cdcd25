"""RL after SFT in the report: RUN/rl.png and report.md's section (docs/brainstacks.md §8).

    plot_rl      one row per aligned domain: the loss per update, the training signal (GRPO / REINFORCE:
                 the sampled completions' mean reward and the share of groups with any reward variance;
                 DPO: the reward accuracy on the step's pairs) and the validation measure at every
                 measured step with its 95% interval, the SFT-only value dashed
    rl_section   the same in a table: SFT-only beside after RL, with n and the interval, a sentence per
                 domain generated from the two numbers and their intervals, and the guard's verdict
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from .plots import _save
from .paper import PAPER_RL


def plot_rl(results: dict[str, dict], path: str | Path) -> Path:
    """`results`: domain -> rl/loop.py's result."""
    fig, axes = plt.subplots(len(results), 3, figsize=(12, 3.2 * len(results)), dpi=110, squeeze=False)
    for row, (domain, r) in zip(axes, results.items()):
        curve, method = r["curve"], r["method"]
        steps = [c["step"] for c in curve]
        updates = [c for c in curve if c.get("update", True)]
        row[0].plot([c["step"] for c in updates], [c["loss"] for c in updates], ".-", lw=1)
        idle = [c["step"] for c in curve if c.get("update", True) is False]
        if idle:  # GRPO steps whose groups' rewards were all equal: no gradient, no update
            row[0].plot(idle, [0.0] * len(idle), "x", color="gray", label="no update (no reward variance)")
            row[0].legend(fontsize=7)
        row[0].set_title(f"{domain} {method}: loss per update")
        if method == "dpo":
            row[1].plot(steps, [c["reward_accuracy"] for c in curve], ".-", lw=1, label="reward accuracy")
            row[1].plot(steps, [c["margin"] for c in curve], ".-", lw=1, label="margin (β log-ratio)")
        else:
            row[1].plot(steps, [c["reward"] for c in curve], ".-", lw=1, label="mean reward of samples")
            row[1].plot(steps, [c["variance_share"] for c in curve], ".-", lw=1, label="groups with reward variance")
        row[1].set_title("training signal")
        row[1].legend(fontsize=7)
        m = r["measures"]
        acc = [x["accuracy"] for x in m]
        err = [[a - x["ci95"][0] for a, x in zip(acc, m)], [x["ci95"][1] - a for a, x in zip(acc, m)]]
        row[2].errorbar([x["step"] for x in m], acc, yerr=err, fmt="o-", capsize=3)
        row[2].axhline(r["before"]["accuracy"], color="gray", ls="--", lw=1, label="SFT only")
        row[2].set_title(f"validation {r['before']['measure'].replace('_', ' ')} (n={r['before']['n']}, 95%)")
        row[2].set_ylim(-0.02, 1.02)
        row[2].legend(fontsize=7)
        if r["guard"]:
            for ax in row:
                ax.axvline(r["guard"]["step"], color="red", lw=1, ls=":")
        for ax in row:
            ax.set_xlabel("RL step")
            ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def _verdict(before: dict, after: dict) -> str:
    """A sentence from the two measures and their 95% intervals."""
    b, a = before["accuracy"], after["accuracy"]
    overlap = after["ci95"][0] <= before["ci95"][1] and before["ci95"][0] <= after["ci95"][1]
    if a == b:
        return f"unchanged at {a:.1%}"
    way = "up" if a > b else "down"
    return (f"{way} from {b:.1%} to {a:.1%}, " +
            ("within each other's 95% intervals (not a measured difference)" if overlap
             else "outside each other's 95% intervals"))


def rl_section(summary: dict | None, plot: str | None = "rl.png") -> str:
    """report.md's RL section from RUN/rl.json's dict (stages/rl.py's rl_summary)."""
    lines = ["## RL after SFT (DPO and GRPO on a domain's last stack)", ""]
    results = (summary or {}).get("domains", {})
    if not results:
        return "\n".join(lines + ["No stack of this run was aligned.", ""])
    lines += [f"The paper: {PAPER_RL}", "",
              "| domain | method | steps | measure (validation) | SFT only | after RL | n | validation loss SFT → RL |",
              "|---|---|---:|---|---:|---:|---:|---|"]
    for domain, r in results.items():
        b, a = r["before"], r["after"]
        lines.append(f"| {domain} | {r['method']} | {r['steps_run']} | {b['measure'].replace('_', ' ')} | "
                     f"{b['accuracy']:.1%} [{b['ci95'][0]:.0%}, {b['ci95'][1]:.0%}] | "
                     f"{a['accuracy']:.1%} [{a['ci95'][0]:.0%}, {a['ci95'][1]:.0%}] | {a['n']} | "
                     f"{b['val_loss']:.4f} → {a['val_loss']:.4f} |")
    lines.append("")
    for domain, r in results.items():
        sentence = f"- {domain} ({r['method']}): {r['before']['measure'].replace('_', ' ')} {_verdict(r['before'], r['after'])}"
        if r["method"] != "dpo":
            steps = {c["step"]: c for c in r["curve"]}  # GRPO logs each of a step's updates: one per step here
            if steps:
                shares = [c["variance_share"] for c in steps.values()]
                idle = sum(1 for c in steps.values() if c.get("update") is False)
                sentence += (f"; {sum(shares) / len(shares):.0%} of the sampled groups had any reward variance "
                             f"(the rest teach GRPO nothing), and {idle} of its {len(steps)} steps had none in any "
                             "group, so made no update")
        if r["guard"]:
            sentence += f"; the guard stopped it at step {r['guard']['step']} ({r['guard']['reason']}) and restored the last good stack"
        lines.append(sentence + ".")
    if plot:
        lines += ["", f"![RL curves]({plot})"]
    return "\n".join(lines + [""])
