"""The evaluation's section of report.md: every mode's loss and accuracies, general held-out text, samples.

Reads RUN/eval.json only (stages/evaluate.py writes it). As everywhere in the report (report.py states
the rule), a sentence that compares modes is counted from the numbers it compares: which domains a mode
beats the base on, which modes the general text's paired intervals put above or below the base.
"""

from __future__ import annotations

from ..evaluation.tasks import wilson_interval
from .report import fence


def share_cell(k: int, n: int) -> str:
    """"12% [8–17%] of 164": the share k/n, its 95% Wilson interval and n. An interval, because a share
    alone reads as exact; Wilson's, because these accuracies sit near 0%, where p̂ ± z·se collapses to
    [0%, 0%] (evaluation/tasks.py)."""
    low, high = wilson_interval(k, n)
    return f"{k / n:.0%} [{low:.0%}–{high:.0%}] of {n}"


def _accuracy_cell(x: dict) -> str:
    """The generated answers' accuracy with its interval and n; "–" when nothing was checked."""
    acc, n = x.get("accuracy"), x.get("n_generated", 0)
    if acc is None or not n:
        return "–"
    return share_cell(round(acc * n), n)  # acc was stored as k/n: round(acc * n) is k again


def _exact_cell(x: dict) -> str:
    """The exact greedy accuracy (teacher-forced) with its interval and n, split by source when it has two."""
    ex = x.get("exact")
    if not ex or not ex["n"]:
        return "–"
    cell = share_cell(ex["correct"], ex["n"])
    if len(ex["by_source"]) > 1:  # math: arithmetic and word problems are different tasks
        cell += " (" + "; ".join(f"{src.split(':')[-1]} {share_cell(v['correct'], v['n'])}"
                                 for src, v in ex["by_source"].items() if v["n"]) + ")"
    return cell


def _choice_cell(x: dict) -> str:
    """The choice accuracy (mean log-prob rule) with its interval and n, and the sum rule's share beside it."""
    ch = x.get("choice")
    if not ch or not ch["n"]:
        return "–"
    return f"{share_cell(ch['correct'], ch['n'])} (sum: {ch['correct_sum'] / ch['n']:.0%})"


def eval_table(e: dict) -> list[str]:
    """Test loss and both accuracies per domain and mode, as markdown table rows: the loss beside what the
    greedy answers got right, because the two can disagree (a lower loss with answers that go wrong)."""
    rows = ["| domain | mode | test loss | choice of 4 | exact greedy answer | generated answers (code: HumanEval pass@1) |",
            "|---|---|---:|---:|---:|---:|"]
    for d in e["domains"]:
        for m in e["modes"]:
            x = e["results"].get(f"{m}/{d}", {})  # a block not evaluated yet: {}, shown "–"
            loss = f"{x['loss']:.3f}" if "loss" in x else "–"
            rows.append(f"| {d} | {m} | {loss} | {_choice_cell(x)} | {_exact_cell(x)} | {_accuracy_cell(x)} |")
    return rows


def general_table(e: dict) -> list[str]:
    """The general held-out prose's loss in every mode, and each mode's paired difference from the base."""
    g = e.get("general") or {}
    if not g:
        return []
    rows = ["| mode | general-text loss | minus base's [95% interval] |", "|---|---:|---:|"]
    for m in e["modes"]:
        if m in g:
            vs = g[m].get("vs_base")
            diff = f"{vs['difference']:+.4f} [{vs['ci95_low']:+.4f}, {vs['ci95_high']:+.4f}]" if vs else "–"
            rows.append(f"| {m} | {g[m]['loss']:.4f} | {diff} |")
    return rows


def general_finding(e: dict) -> str:
    """Which modes the general held-out prose says are measurably above or below the base (paired interval)."""
    g = e.get("general") or {}
    vs = {m: g[m]["vs_base"] for m in e["modes"] if m in g and g[m].get("vs_base")}
    if not vs:
        return "The general held-out text was not measured in the base and another mode."
    above = [m for m, v in vs.items() if v["ci95_low"] > 0]
    below = [m for m, v in vs.items() if v["ci95_high"] < 0]
    level = [m for m in vs if m not in above and m not in below]
    parts = [f"{label}: {', '.join(ms)}" for label, ms in (("measurably above the base's loss", above),
                                                          ("measurably below it", below),
                                                          ("not measurably different", level)) if ms]
    n = next(iter(vs.values()))["documents"]
    return f"On {n} general held-out documents (paired 95% intervals), " + "; ".join(parts) + "."


def code_lines(e: dict) -> str:
    """How many HumanEval problems fit the context, and the stdlib format check named as what it is."""
    cells = [(m, e["results"].get(f"{m}/code", {})) for m in e["modes"]]
    lines = []
    he = [(m, x["humaneval"]) for m, x in cells if x.get("humaneval")]
    if he:  # n_fit < n says how much of a 0% is problems too long for the context to be asked
        lines.append("HumanEval problems whose prompt fits the context (asked): "
                     + ", ".join(f"{m} {h['n_fit']} of {h['n']}" for m, h in he) + ".")
    checked = [(m, x) for m, x in cells if x.get("format_ok") is not None]
    if checked:  # the stdlib split has no unit tests: the check is spelled out, not to be read as accuracy
        lines.append("Code, stdlib test split, **format check only** (the answer parses and defines the requested "
                     "name and parameters; it is never called, so `return 42` passes): "
                     + ", ".join(f"{m} {x['format_ok']:.0%} of {x['n_format_checked']}" for m, x in checked) + ".")
    return " ".join(lines)


def choice_finding(e: dict) -> str:
    """Where each mode's choice accuracy stands to the base's, domain by domain, counted from eval.json:
    above at all, and above with the two 95% intervals apart (an unpaired, conservative reading)."""
    sentences = []
    for mode in [m for m in e.get("modes", ()) if m != "base"]:
        pairs = [(d, e["results"].get(f"base/{d}", {}).get("choice"), e["results"].get(f"{mode}/{d}", {}).get("choice"))
                 for d in e["domains"]]
        pairs = [(d, b, x) for d, b, x in pairs if b and x and b["n"] and x["n"]]
        if not pairs:
            continue
        above = [d for d, b, x in pairs if x["correct"] / x["n"] > b["correct"] / b["n"]]
        apart = [d for d, b, x in pairs
                 if wilson_interval(x["correct"], x["n"])[0] > wilson_interval(b["correct"], b["n"])[1]]
        sentences.append(f"{mode} above the base on {len(above)} of {len(pairs)} domains"
                         + (f" ({', '.join(above)})" if above else "")
                         + f", with the intervals apart on {len(apart)}" + (f" ({', '.join(apart)})" if apart else ""))
    return ("Choice of 4 (chance 25%): " + "; ".join(sentences) + ".") if sentences else ""


def eval_finding(e: dict) -> str:
    """How each routed mode's test loss stands to base and ungated, domain by domain, counted from eval.json."""
    sentences = []
    for mode in [m for m in ("routed", "switched") if m in e.get("modes", ("routed",))]:
        rows = [(d, e["results"].get(f"base/{d}", {}).get("loss"), e["results"].get(f"ungated/{d}", {}).get("loss"),
                 e["results"].get(f"{mode}/{d}", {}).get("loss")) for d in e["domains"]]
        rows = [r for r in rows if None not in r]  # only domains in all three modes: one n for both counts
        if not rows:
            sentences.append(f"No domain was evaluated in base, ungated and {mode} mode.")
            continue
        below_base = [d for d, b, u, r in rows if r < b]  # the stacks help at all
        below_ungated = [d for d, b, u, r in rows if r < u]  # routing beats switching every stack on
        sentences.append(f"{mode.capitalize()} test loss is below the base's on {len(below_base)} of {len(rows)} domains"
                         + (f" ({', '.join(below_base)})" if below_base else "")
                         + f" and below ungated's on {len(below_ungated)} of {len(rows)}"
                         + (f" ({', '.join(below_ungated)})" if below_ungated else "") + ".")
    return " ".join(sentences)


def _penalties(cfg: dict) -> str:
    """The repetition penalties the answers were decoded with, from the recorded EvalConfig."""
    if "repetition_penalty" not in cfg:
        return ""
    return (f" Repetition penalty {cfg['repetition_penalty']:g}"
            + (f" (HumanEval: {cfg['humaneval_repetition_penalty']:g})." if "humaneval_repetition_penalty" in cfg else "."))


def eval_section(e: dict, figure: str) -> str:
    """Every mode from RUN/eval.json (stages/evaluate.py; docs/brainstacks.md §7, §9 Exp 3): what is scored,
    the loss and accuracy table, the code lines, the general held-out text, the mean routed weights, the
    counted findings, the paper's Table 4 for scale, and the same prompts answered in every mode.
    `figure`: eval.png's path relative to the report."""
    cfg = e["config"]  # the EvalConfig the run was evaluated with
    lines = ["## Base, ungated, routed and switched (the paper's Table 4 and §5.3)", "",
             "Modes: *base* every stack off; *ungated* every stack on at weight 1; *routed* the router's weights "
             "(the paper's rule: a switched-on domain at weight p); *switched* the same domains at weight 1.", "",
             f"Test split of each domain: loss over {cfg['n_loss']} examples. *Choice of 4*: of the first "
             f"{cfg.get('n_choice', 0)} test examples, the share whose reference response has a higher mean log-prob "
             "per token (the paper's rule for multiple choice) than each of 3 responses to other test prompts of "
             "its kind, with a different answer where the domain has one (chance 25%; *sum*: the share by summed "
             "log-prob, lm-evaluation-harness's `acc`). *Exact greedy answer*: of the first "
             f"{cfg.get('n_exact', 0)} test examples with a checkable answer, the share whose greedy answer (repetition "
             "penalty as generation's) is exactly the reference response, checked by teacher forcing (one forward per "
             "example gives the verdict generation would; a different but correct working counts as wrong). "
             f"*Generated answers*: greedy answers generated for the first {cfg['n_generate']} and scored by the "
             "domain's check (math: the `####` number; reasoning: the final answer; medical: the ICD code, or "
             "word-overlap F1 ≥ 0.5 with a definition; chat: nothing checkable). Code: HumanEval pass@1 — greedy "
             "answers run against each problem's unit tests in the sandbox; a problem whose prompt does not fit in "
             "the context counts as failed." + _penalties(cfg) + " Each accuracy is shown with its 95% Wilson "
             "interval and n.", "",
             *eval_table(e), "", code_lines(e), ""]
    if e.get("general"):
        lines += ["General held-out text: documents of no domain (the Python reference manual's topics that "
                  "pretraining did not read; data.general_text), every token scored, each document routed on its "
                  "own text in the routed modes — the miniature's analogue of the paper's general benchmarks.", "",
                  *general_table(e), "", general_finding(e), ""]
    if e.get("routes"):
        lines += ["Mean routed weight per domain's test prompts:", "",  # column: the weight of a domain's stacks
                  "| prompts | " + " | ".join(e["domains"]) + " |", "|---|" + "---:|" * len(e["domains"])]
        for d, r in e["routes"].items():
            lines.append(f"| {d} | " + " | ".join(f"{r['mean_weight'][x]:.2f}" for x in e["domains"]) + " |")
        lines.append("")
    # the paper's benchmarks are not ours: quoted for scale, with its own count, never compared with ours
    lines += [eval_finding(e), "", choice_finding(e), "",
              "The paper's Table 4 (Gemma 3 12B, zero-shot benchmarks, base → routed), for scale; it is not measured "
              "here: " + ", ".join(f"{k} {a:.3f} → {b:.3f}" for k, (a, b) in e["paper_table4"].items())
              + f" (routed above base on {sum(b > a for a, b in e['paper_table4'].values())} of "
              f"{len(e['paper_table4'])}).", "",
              f"![evaluation]({figure})", "", "### The same prompts in every mode", ""]
    for s in e["samples"]:  # the paper's three-panel comparison: each mode's answer and the weights it ran
        lines += [f"**{s['label']}**", "", fence(s["prompt"]), ""]
        for mode, a in s["answers"].items():
            lines += [f"*{mode}* ({a['weights']}):", "", fence(a["completion"] or "(empty)"), ""]
    return "\n".join(lines)


# -- the harness (stages/harness_eval.py, RUN/harness.json) -------------------------------------------

def harness_finding(h: dict) -> str:
    """How many tasks routed scores above / below base beyond both 95% intervals, counted from harness.json."""
    from ..evaluation.harness_tasks import headline_metric

    above, below, level = [], [], []
    for task in h["tasks"]:
        per_mode = h["results"].get(task, {})
        metric = headline_metric(per_mode.get("base", {}))
        if metric is None or metric not in per_mode.get("routed", {}):
            continue
        b, r = per_mode["base"][metric], per_mode["routed"][metric]
        name = task.replace("ministacks_", "")
        if r["interval"][0] > b["interval"][1]:
            above.append(name)
        elif r["interval"][1] < b["interval"][0]:
            below.append(name)
        else:
            level.append(name)
    n = len(above) + len(below) + len(level)
    if not n:
        return "No task was scored in both base and routed mode."
    parts = [f"routed is above base beyond both 95% intervals on {len(above)} of {n} tasks"
             + (f" ({', '.join(above)})" if above else ""),
             f"below on {len(below)}" + (f" ({', '.join(below)})" if below else ""),
             f"within the intervals on {len(level)}"]
    return "By each task's headline metric, " + "; ".join(parts) + "."


def harness_section(h: dict, figure: str) -> str:
    """report.md's harness section from RUN/harness.json: the table per task × mode, a counted finding,
    the figure; the paper's Table 4 beside ours where it ran, or why it did not."""
    from ..evaluation.harness_tasks import harness_lines, table4_lines
    from .paper import PAPER_TABLE4

    lines = ["## Benchmarks through lm-evaluation-harness", "",
             "Local tasks from the test splits, run by lm-evaluation-harness with our model wrapper "
             "(`evaluation/harness.py`): a four-way choice per domain (acc and acc_norm are the harness's "
             "sum and per-character rules, acc_mean the paper's mean log-prob per token), GSM-Symbolic word "
             "problems (the number after ####). Each request is routed on its own prompt. Value [95% interval].",
             "", *harness_lines(h["results"]), "", harness_finding(h), "", f"![harness]({figure})", ""]
    if "table4" in h:
        lines += ["The paper's Table 4 (limit 200; the paper's numbers are Gemma 3 12B IT's):", "",
                  *table4_lines(h["table4"], PAPER_TABLE4), ""]
    elif "table4_unavailable" in h:
        lines += [f"The paper's Table 4 did not run: {h['table4_unavailable']}", ""]
    return "\n".join(lines)
