"""The paper's findings beside ours: one table row each, every cell and every verdict generated from the JSON.

    row  finding                                      ours from                          paper from
    1    Exp 1: MoE-LoRA below LoRA at every          compare.json "moe"/"lora"          compare.json "paper"
         checkpoint                                   "val_curve"                        (PAPER_EXP1)
    2    Exp 1: final loss gap, MoE-LoRA − LoRA       compare.json "moe"/"lora" "final"  the same
    3    boosting: round 2's best below round 1's     boost.json "rounds", "control"     boost.json "paper"
    4    null-space lowers the cross-domain losses    forgetting.json "runs" → "with /   forgetting.json
                                                      without null-space" → "matrix"     "paper"
    5    the oracle serves medical with chat+math     RUN/router.json "oracle"           router.json "paper"
    6    routing: routed below ungated and base       RUN/eval.json "results"            eval.json "paper_table4"
    7    general text: routed not above the base      RUN/eval.json "general"            eval.json "paper_table4"

(A file not given, or one written before a key existed, falls back to report/paper.py for the paper's
column and says "not recorded" in ours.)

The verdict. Each finding is counted in units (n, the table's last column): s units go the paper's way,
r go the reverse way, and a tie goes neither way.

    unit                                   paper's way                reverse way
    1  a checkpoint after step 0           MoE-LoRA's loss < LoRA's   MoE-LoRA's loss > LoRA's
    2  the final checkpoint (n = 1)        MoE − LoRA < 0             MoE − LoRA > 0
    3  round 2 against round 1 (n = 1)     round 2's best < round 1's round 2's best > round 1's
    4  a below-diagonal cell of the        with null-space < without  with null-space > without
       forgetting matrix (ungated)
    5  a medical prompt of the oracle      won by chat+math           won by the medical stack alone
                                           (the paper's 32 of 33)     (the paper's other answer, 1 of 33)
    6  a domain of the evaluation          routed < ungated and       routed > ungated and
       (test loss)                         routed < base              routed > base
    7  the general held-out text (n = 1)   routed − base's paired     the interval lies above 0
                                           95% interval reaches 0     (routed measurably worse)
                                           or below

Rows 1–3 and 7 claim something of every unit (row 1: "at every checkpoint"; rows 2, 3 and 7 have one), so

    reproduced       s = n          opposite   r = n          not reproduced   otherwise (mixed or tied)

Rows 4–6 are counts that the paper itself does not claim of every unit (it lowered 5 of the 6 cells;
chat+math won 32 of 33 prompts), so they go by the majority:

    reproduced       s > n/2        opposite   r > n/2        not reproduced   otherwise

and "not measured" where n = 0: the file was not given, it lacks the key, or the run did not do the
comparison (one boosting round; one continual run; no medical prompts; no domain in all three modes; no general
text). Row 7 has no tolerance: "≈ base" is read as "not measurably above it", the strictest reading.
Row 3's verdict is the paper's finding alone; the control (one stack trained as long as all the rounds,
which the paper does not run) is beside it in "ours" and in a sentence of its own under the table.

Under the table, one sentence per row that is not "reproduced": what differs between the two settings,
from what the files record (base size, adapter, steps, domains, prompts, what was measured).
"""

from __future__ import annotations

from fractions import Fraction

from .paper import (GENERAL_BENCHMARKS, PAPER_BOOST, PAPER_EXP1, PAPER_FORGETTING, PAPER_ORACLE, PAPER_STACK_SHARE,
                    PAPER_TABLE4)

VERDICTS = ("reproduced", "not reproduced", "opposite", "not measured")
NOT_RECORDED = "not recorded"
EXP1_BASE = "TinyLlama-1.1B"  # the paper's Exp 1 base: its key in PAPER_STACK_SHARE


def verdict(same: int, reverse: int, n: int, rule: str) -> str:
    """The verdict of `same` units in the paper's direction and `reverse` against it, of `n` compared.
    `rule`: "every" (reproduced only if every unit goes the paper's way) or "majority" (more than half)."""
    if n == 0:
        return "not measured"
    if rule == "every":
        return "reproduced" if same == n else "opposite" if reverse == n else "not reproduced"
    if rule == "majority":
        return "reproduced" if 2 * same > n else "opposite" if 2 * reverse > n else "not reproduced"
    raise ValueError(f"unknown verdict rule {rule!r}: use 'every' or 'majority'")


def _row(finding: str, paper: str, ours: str, verdict: str, n: int, note: str = "") -> dict:
    return {"finding": finding, "paper": paper, "ours": ours, "verdict": verdict, "n": n, "note": note}


def _unmeasured(finding: str, paper: str, why: str, ours: str = NOT_RECORDED) -> dict:
    return _row(finding, paper, ours, "not measured", 0, f"Not measured here: {why}.")


def compare_word(ours: float, theirs: float) -> str:
    """How `ours` stands to `theirs`, in the word every comparison sentence of report.md uses."""
    return "equal to" if ours == theirs else "below" if ours < theirs else "above"


# -- Exp 1: MoE-LoRA against the parameter-matched single LoRA (compare.json) ---------------------------

def _curves(c: dict | None) -> tuple[dict, dict] | None:
    """({step: loss} of MoE-LoRA, of LoRA) from compare.json, or None when an arm is missing."""
    try:
        return tuple({int(s): v for s, v in c[k]["val_curve"]} for k in ("moe", "lora"))
    except (KeyError, TypeError):
        return None


def _count(arm: dict) -> str:
    return f"{arm['params']:,}" if "params" in arm else "an unrecorded number of"


def _exp1_setting(c: dict) -> str:
    """Exp 1's setting here and in the paper, from compare.json; what it lacks is said to be unrecorded."""
    p = c.get("paper", PAPER_EXP1)
    moe, lora = c["moe"], c["lora"]
    base = f"a {c['base_params']:,}-parameter base" if "base_params" in c else "a base of unrecorded size"
    a = c.get("adapter")
    shape = (f"MoE-LoRA {a['n_experts']} × r{a['r']} top-{a['top_k']} against LoRA r{a['lora_r']}" if a
             else "MoE-LoRA against LoRA (adapter shapes not recorded)")
    share = f", one stack {c['stack_share']['moe']:.1%} of the base" if "stack_share" in c else ""
    paper_share = c.get("paper_stack_share", PAPER_STACK_SHARE).get(EXP1_BASE)
    paper_share = f", {paper_share:.1%} of the base" if paper_share is not None else ""
    last = int(moe["val_curve"][-1][0])
    return (f"Exp 1 here: {base} ({c.get('quant', 'precision not recorded')}), {shape}, with {_count(moe)} "
            f"and {_count(lora)} parameters{share}; {last} steps with {len(moe['val_curve']) - 1} "
            f"checkpoints. In the paper: {EXP1_BASE}, stacks of {p['params']['moe'] / 1e6:.1f}M and "
            f"{p['params']['lora'] / 1e6:.1f}M parameters{paper_share}, {p['steps'][-1]} steps with "
            f"{len(p['steps'])} checkpoints.")


def exp1_checkpoints(c: dict | None) -> dict:
    finding = "Exp 1: MoE-LoRA's validation loss below the parameter-matched LoRA's at every checkpoint"
    p = (c or {}).get("paper", PAPER_EXP1)
    paper = f"{sum(m < lo for m, lo in zip(p['moe'], p['lora']))} of {len(p['moe'])} checkpoints"
    curves = _curves(c)
    if curves is None:
        return _unmeasured(finding, paper, "no compare.json" if not c else "compare.json lacks an arm's curve")
    moe, lora = curves
    steps = [s for s in moe if s in lora and s > 0]  # step 0: both arms are the zero-init identity
    if not steps:
        return _unmeasured(finding, paper, "compare.json's curves have no checkpoint after step 0")
    same, reverse = sum(moe[s] < lora[s] for s in steps), sum(moe[s] > lora[s] for s in steps)
    ours = f"{same} of {len(steps)} checkpoints" + (f" (LoRA below at {reverse})" if reverse else "")
    return _row(finding, paper, ours, verdict(same, reverse, len(steps), "every"), len(steps), _exp1_setting(c))


def exp1_final_gap(c: dict | None) -> dict:
    finding = "Exp 1: final validation loss gap, MoE-LoRA − LoRA"
    p = (c or {}).get("paper", PAPER_EXP1)
    paper = f"{p['moe'][-1]:.4f} − {p['lora'][-1]:.4f} = {p['moe'][-1] - p['lora'][-1]:+.4f}"
    if _curves(c) is None:
        return _unmeasured(finding, paper, "no compare.json" if not c else "compare.json lacks an arm's curve")
    moe, lora = (c[k].get("final", c[k]["val_curve"][-1][1]) for k in ("moe", "lora"))
    gap = moe - lora
    ours = f"{moe:.4f} − {lora:.4f} = {gap:+.4f}"
    return _row(finding, paper, ours, verdict(int(gap < 0), int(gap > 0), 1, "every"), 1, _exp1_setting(c))


# -- residual boosting (boost.json) --------------------------------------------------------------------

def control_sentence(b: dict | None) -> str:
    """Boosting's best against the control's (one stack, the rounds' total steps), or that none ran."""
    if not b or not b.get("rounds"):
        return ""
    if "control" not in b:
        return "The control (one stack trained for as many steps as all the boosting rounds) was not run."
    c, best = b["control"], min(r["best_loss"] for r in b["rounds"])
    ran = f"; the guard stopped it by {c['stop_reason']} after {c['steps_run']}" if c.get(
        "steps_run", c["steps"]) < c["steps"] else ""
    return (f"Control (not in the paper): one fresh stack trained for the rounds' {c['steps']} steps{ran} reached "
            f"{c['best_loss']:.4f}; boosting's best ({best:.4f}, {len(b['rounds'])} rounds) is "
            f"{compare_word(best, c['best_loss'])} it ({best - c['best_loss']:+.4f}).")


def boosting(b: dict | None) -> dict:
    finding = "Residual boosting: round 2's best below round 1's"
    p = (b or {}).get("paper", PAPER_BOOST)
    paper = f"{p['note']}; best {p['round2_best']:.4f}"
    rounds = (b or {}).get("rounds")
    if not rounds:
        return _unmeasured(finding, paper, "no boost.json" if not b else "boost.json holds no rounds")
    best = [r["best_loss"] for r in rounds]
    if "control" in b:
        c = b["control"]
        control = (f"control, one stack for {c['steps']} steps: {c['best_loss']:.4f} "
                   f"(boosting {compare_word(min(best), c['best_loss'])} it)")
    else:
        control = "control not run"
    ours = "rounds' best " + " → ".join(f"{v:.4f}" for v in best) + f"; {control}"
    if len(best) < 2:
        return _unmeasured(finding, paper, "only one boosting round ran, so there is no round 2", ours)
    steps = ", ".join(str(r.get("steps_run", NOT_RECORDED)) for r in rounds)
    paper_steps = f" ({p['steps_per_round']} steps a round)" if "steps_per_round" in p else ""
    note = (f"Boosting here: {len(rounds)} rounds on {b.get('domain', 'an unrecorded domain')} of {steps} steps, "
            f"stopping when a round after the first gains less than {b.get('min_improvement', NOT_RECORDED)}. "
            f"In the paper: {p['note']}{paper_steps}.")
    return _row(finding, paper, ours, verdict(int(best[1] < best[0]), int(best[1] > best[0]), 1, "every"), 1, note)


# -- null-space projection (forgetting.json) -----------------------------------------------------------

def lowered(with_ns: list[list], without_ns: list[list]) -> tuple[int, int, int]:
    """(cells lower with null-space, cells higher, cells compared) below the diagonal of two forgetting
    matrices: an earlier domain's loss after a later one was trained, where forgetting shows."""
    pairs = [(a, b) for i, (ra, rb) in enumerate(zip(with_ns, without_ns)) for j, (a, b) in enumerate(zip(ra, rb))
             if j < i and a is not None and b is not None]
    return sum(a < b for a, b in pairs), sum(a > b for a, b in pairs), len(pairs)


def _ns_setting(f: dict, p: dict) -> str:
    ks = sorted({e["k_per_domain"] for layers in f.get("capacity_by_projection", {}).values()
                 for e in layers.values() if "k_per_domain" in e})
    k = "–".join(str(v) for v in sorted({ks[0], ks[-1]})) if ks else ""  # one K, or the range the cap left
    k = f", {k} directions kept per earlier domain and projection" if ks else ", directions per domain not recorded"
    domains = f.get("domains") or []
    return (f"The null-space comparison here: {' → '.join(domains) or 'domains not recorded'} ({len(domains)} "
            f"domains{k}). In the paper: {' → '.join(p['domains'])} ({len(p['domains'])} domains).")


def nullspace(f: dict | None) -> dict:
    finding = "Null-space projection lowers the cross-domain (below-diagonal, ungated) losses"
    p = (f or {}).get("paper", PAPER_FORGETTING)
    ps, _, pn = lowered(p["with null-space"], p["without null-space"])
    paper = f"lower in {ps} of {pn} cells"
    runs = (f or {}).get("runs", {})
    if "with null-space" not in runs or "without null-space" not in runs:
        why = (f"forgetting.json holds one run ({', '.join(runs)}), not both: the comparison was not run" if runs
               else "no forgetting.json" if not f else "forgetting.json records no runs")
        return _unmeasured(finding, paper, why, "comparison not run" if runs else NOT_RECORDED)
    same, reverse, n = lowered(runs["with null-space"]["matrix"], runs["without null-space"]["matrix"])
    if n == 0:
        return _unmeasured(finding, paper, "the forgetting matrices have no cell below the diagonal (one domain)")
    ours = f"lower in {same} of {n} cells" + (f" (higher in {reverse})" if reverse else "")
    return _row(finding, paper, ours, verdict(same, reverse, n, "majority"), n, _ns_setting(f, p))


# -- the oracle (router.json) --------------------------------------------------------------------------

def oracle(r: dict | None) -> dict:
    finding = "The oracle: medical prompts are best served by chat+math"
    paper_shares = (r or {}).get("paper", {}).get("oracle", PAPER_ORACLE)["medical"]
    combo, share = max(paper_shares.items(), key=lambda kv: kv[1])  # the paper's winner
    count = Fraction(share).limit_denominator(1000)  # the shares are k/n: 32/33 back from 0.9697
    paper = f"{combo} on {count.numerator} of {count.denominator} medical prompts ({share:.0%})"
    o = (r or {}).get("oracle", {}).get("medical")
    if not o or not o.get("n"):
        return _unmeasured(finding, paper, "no router.json" if not r else "router.json's oracle has no medical prompts")
    domains = r.get("domains") or []
    missing = [d for d in combo.split("+") if d not in domains]
    if missing:  # the paper's winner cannot win where one of its stacks was never trained
        return _unmeasured(finding, paper, f"this run has no {' or '.join(missing)} stacks "
                                           f"(its domains: {', '.join(domains)})")
    n, shares = o["n"], o["shares"]
    # shares are k/n of n prompts: round(share · n) is the count again
    same, reverse = round(shares.get(combo, 0.0) * n), round(shares.get("medical", 0.0) * n)
    top = max(shares.values())
    winners = " / ".join(k for k, v in shares.items() if v == top)
    ours = f"{combo} on {same} of {n} ({same / n:.0%}); most common: {winners} ({top:.0%})"
    floor = f", chat at ≥ {r['oracle_chat_floor']} in every combination" if r.get("oracle_chat_floor") else ""
    note = (f"The oracle here: {n} medical prompts, {len(domains)} domain stacks ({', '.join(domains)}), "
            f"{r.get('search', 'an unrecorded')} search{floor}. In the paper: {count.denominator} medical prompts.")
    return _row(finding, paper, ours, verdict(same, reverse, n, "majority"), n, note)


# -- routed inference (eval.json) ----------------------------------------------------------------------

def routing(e: dict | None) -> dict:
    finding = "Routing: routed loss below ungated's (stacks that interfere) and base's (stacks that do not help)"
    table = (e or {}).get("paper_table4", PAPER_TABLE4)
    kept = sum(routed >= base for base, routed in table.values())
    paper = f"routed ≥ base on {kept} of {len(table)} benchmarks (Table 4, accuracy)"
    res = (e or {}).get("results", {})
    losses = [[res.get(f"{m}/{d}", {}).get("loss") for m in ("base", "ungated", "routed")]
              for d in (e or {}).get("domains", [])]
    losses = [x for x in losses if None not in x]  # only domains measured in all three modes
    if not losses:
        return _unmeasured(finding, paper, "no eval.json" if not e else "eval.json has no domain in all three modes")
    n = len(losses)
    same = sum(r < u and r < b for b, u, r in losses)
    reverse = sum(r > u and r > b for b, u, r in losses)
    ours = (f"below both on {same} of {n} domains (below base on {sum(r < b for b, _, r in losses)}, below ungated "
            f"on {sum(r < u for _, u, r in losses)})")
    n_loss = e.get("config", {}).get("n_loss", NOT_RECORDED)
    note = (f"Here: test loss (lower is better) over {n_loss} examples of each of {n} domains, in base, ungated "
            f"and routed mode. In the paper: zero-shot accuracy (higher is better) on {len(table)} benchmarks "
            f"({', '.join(table)}), base and routed; the two columns count different measures.")
    return _row(finding, paper, ours, verdict(same, reverse, n, "majority"), n, note)


# -- the section ---------------------------------------------------------------------------------------

def general_text(e: dict | None) -> dict:
    finding = "General text: routed no worse than the base (ungated stacks may hurt it)"
    table = (e or {}).get("paper_table4", PAPER_TABLE4)
    general = {k: v for k, v in table.items() if k in GENERAL_BENCHMARKS}
    worst = min(b - a for a, b in general.values())
    paper = (f"routed at most {-worst * 100:.1f} points below base on its {len(general)} general benchmarks "
             f"({', '.join(general)}; Table 4, accuracy), above it on {sum(b > a for a, b in general.values())}")
    g = (e or {}).get("general") or {}
    routed, ungated = g.get("routed", {}).get("vs_base"), g.get("ungated", {}).get("vs_base")
    if not routed:
        return _unmeasured(finding, paper, "no eval.json" if not e else "eval.json has no general text in base and routed mode")

    def diff(v: dict) -> str:
        return f"{v['difference']:+.4f} [{v['ci95_low']:+.4f}, {v['ci95_high']:+.4f}]"

    ours = f"routed − base {diff(routed)}" + (f"; ungated − base {diff(ungated)}" if ungated else "")
    same, reverse = int(routed["ci95_low"] <= 0), int(routed["ci95_low"] > 0)
    note = (f"Here: loss (lower is better) on {routed['documents']} held-out documents of the Python reference "
            "manual, which the base's pretraining read other topics of and no stack trained on, with paired 95% "
            f"intervals. In the paper: zero-shot accuracy (higher is better) of Gemma 3 12B on {len(general)} "
            "general benchmarks; the two count different measures.")
    return _row(finding, paper, ours, verdict(same, reverse, 1, "every"), 1, note)


def findings_rows(compare: dict | None, boost: dict | None, forgetting: dict | None, router: dict | None,
                  evaluation: dict | None) -> list[dict]:
    """The seven findings as data: {"finding", "paper", "ours", "verdict", "n", "note"}, in the table's order.
    Any input may be None (the file was not written): its rows are "not measured"."""
    return [exp1_checkpoints(compare), exp1_final_gap(compare), boosting(boost), nullspace(forgetting),
            oracle(router), routing(evaluation), general_text(evaluation)]


def findings_section(compare: dict | None, boost: dict | None, forgetting: dict | None, router: dict | None,
                     evaluation: dict | None) -> str:
    """## Findings: the paper's, and ours — the rows of `findings_rows` as one table, then a sentence for
    each row that is not reproduced (what differs between the settings) and the boosting control's."""
    rows = findings_rows(compare, boost, forgetting, router, evaluation)
    lines = ["## Findings: the paper's, and ours", "",
             "Each of the paper's findings beside ours, counted over n units (checkpoints, cells, prompts, "
             "domains). Rows 1–3 and 7 are reproduced when every unit goes the paper's way and opposite when "
             "every one goes the other way; rows 4–6 by the majority of units (report/findings.py defines each unit).",
             "", "| finding | paper | ours | verdict | n |", "|---|---|---|---|---:|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i}. {r['finding']} | {r['paper']} | {r['ours']} | {r['verdict']} | {r['n']} |")
    by_note: dict[str, list[str]] = {}  # rows 1 and 2 share Exp 1's setting: one sentence, both numbers
    for i, r in enumerate(rows, 1):
        if r["verdict"] != "reproduced" and r["note"]:
            by_note.setdefault(r["note"], []).append(str(i))
    notes = [f"- {', '.join(nums)}. {note}" for note, nums in by_note.items()]
    if notes:
        lines += ["", "Where a finding is not reproduced, the two settings:", "", *notes]
    control = control_sentence(boost)
    if control:
        lines += ["", control]
    return "\n".join(lines) + "\n"
