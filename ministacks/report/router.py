"""report.md's router section: the meta-router's scores, the oracle's winning combinations of stacks per
domain beside the paper's finding, and the routes the trained router takes (docs/brainstacks.md §6).

Reads RUN/router.json (stages/route.py). Like every section, each sentence that compares numbers is
generated from them, and the rule it states (the selection score, the inference rule) is the one the
run's RouterConfig recorded.
"""

from __future__ import annotations

from dataclasses import asdict

from ..routing.router import RouterConfig


def _pct(v) -> str:
    """A share as a whole percentage, "–" for None."""
    return "–" if v is None else f"{v:.0%}"


def _shares_row(o: dict) -> str:
    """The five most frequent combinations and their shares ("chat+math 60%, base 20%, ..."); `o["shares"]`
    comes largest first (routing/oracle.py's `shares`), so the first five are the top five."""
    return ", ".join(f"{c} {v:.0%}" for c, v in list(o["shares"].items())[:5])


def oracle_finding(r: dict) -> str:
    """The paper's medical finding beside ours, in a sentence built from both numbers.
    router.json's "paper" holds the paper's shares (docs/brainstacks.md §6: chat+math on 32 of 33 medical
    prompts), its "oracle" ours. The sentence names both winners, says whether they are the same, and
    gives the share the paper's winner got here."""
    paper = r["paper"]["oracle"]["medical"]  # report/paper.py's PAPER_ORACLE
    paper_combo, paper_share = max(paper.items(), key=lambda kv: kv[1])
    o = r["oracle"].get("medical")
    if not o or not o["n"]:  # no medical domain, or no medical prompt kept: nothing to set beside the paper
        return (f"The paper found medical prompts best served by {paper_combo} in {paper_share:.0%} of cases; "
                "this run has no medical prompts to compare.")
    ours_combo, ours_share = next(iter(o["shares"].items()))  # largest first: our most frequent winner
    same = o["shares"].get(paper_combo, 0.0)  # the paper's winner may never win here: 0%, said as such
    verdict = "the same winner" if ours_combo == paper_combo else "a different winner"
    return (f"The paper found medical prompts best served by {paper_combo} in {paper_share:.0%} of cases (32 of 33). "
            f"Here the most frequent winner on the {o['n']} medical prompts is {ours_combo} ({ours_share:.0%}), "
            f"{verdict}; {paper_combo} won {same:.0%}.")


def router_section(r: dict, figure: str) -> str:
    """The router's scores, the oracle's winning combinations per domain (beside the paper's finding),
    and the routes the trained router takes. `figure`: router.png's path relative to the report. Reads
    RUN/router.json (stages/route.py). Two kinds of score, kept apart: against the oracle's targets
    (what the router is trained and its epoch selected on) and against the prompts' domain labels."""
    n = r["n_prompts"]
    floor = r.get("oracle_chat_floor")  # None: the oracle ran without the chat floor (oracle.py's oracle_floor)
    # the selection score and the inference rule as the run's RouterConfig set them (router.json "config");
    # a router.json written before it was recorded ran with the defaults, which are the paper's (§6)
    c = {**asdict(RouterConfig()), **r.get("config", {})}
    lines = ["## Meta-router: which stacks a prompt needs", "",
             f"Trained on {n['single']} single-domain prompts (targets from the oracle's outcomes) and {n['mixed']} "
             f"mixed-domain prompts (multi-hot labels: {', '.join(r['mixed_kinds'])}); {n['train']} train / "
             f"{n['val']} held-out, split by prompt groups. {r['params']:,} parameters, {r['search']} target search.",
             "",
             f"- against the targets it learns from: **single-domain top-1 {r['single_top1']:.1%}**, **mixed set match "
             f"{r['mixed_set_match']:.1%}**, val BCE {r['val_bce']:.3f} (epoch {r['best_epoch']} kept by "
             f"{c['select_top1']:.2f}·top-1 + {c['select_mixed']:.2f}·mixed − {c['select_bce']:.2f}·BCE)",
             f"- against the prompts' domain labels: top-1 {r['label_top1']:.1%}, set match {r['label_set_match']:.1%}",
             "",
             "**The oracle's best combination of stacks**, share of each domain's prompts (the base alone = `base`"
             + (f"; every combination runs chat at ≥ {floor}, as inference does" if floor else "") + "). "
             + oracle_finding(r), ""]
    # one column per search: after an exhaustive one, also the released code's greedy search on the same
    # losses (route.py's searches_compared); a router.json without "oracle_by_search" gets one from "oracle"
    searches = r.get("oracle_by_search", {})
    header = " | ".join(f"{s} search" for s in searches) or "winning combinations"
    lines += [f"| prompts | n | {header} |", "|---|---:|" + "---|" * max(1, len(searches))]
    for d, o in r["oracle"].items():
        cells = [_shares_row(searches[s][d]) for s in searches] or [_shares_row(o)]
        lines.append(f"| {d} | {o['n']} | " + " | ".join(cells) + " |")
    # what the trained router does on its held-out prompts, as routing_weights switches stacks on
    lines += ["", "**What the router switches on** for held-out prompts "
              f"(inference rule: chat ≥ {c['chat_floor']:g}, p ≤ {c['threshold']:g} off):", "",
              "| prompts | n | switched-on stacks |", "|---|---:|---|"]
    for d, o in r["routes"].items():
        lines.append(f"| {d} | {o['n']} | " + _shares_row(o) + " |")
    lines += ["", f"![router]({figure})", ""]
    return "\n".join(lines)
