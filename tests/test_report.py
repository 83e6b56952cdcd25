"""The report says only what was measured: every comparing sentence follows the numbers it compares."""

from ministacks.report.evaluation import eval_finding, eval_section, eval_table, general_finding, general_table
from ministacks.report.report import boost_section, forgetting_section
from ministacks.report.router import oracle_finding

DOMAINS = ["chat", "math"]


def _eval(losses: dict) -> dict:
    """A minimal eval.json: {mode/domain: loss}."""
    return {"domains": DOMAINS, "modes": ["base", "ungated", "routed"],
            "results": {k: {"loss": v} for k, v in losses.items()}, "routes": {}, "samples": [],
            "config": {"n_loss": 10, "n_generate": 2}, "paper_table4": {"GSM8K": (0.665, 0.665)}}


def test_eval_sentence_follows_the_numbers():
    good = _eval({"base/chat": 3.0, "ungated/chat": 2.0, "routed/chat": 1.5,
                  "base/math": 3.0, "ungated/math": 2.0, "routed/math": 2.5})
    bad = _eval({"base/chat": 1.0, "ungated/chat": 1.0, "routed/chat": 1.5,
                 "base/math": 1.0, "ungated/math": 1.0, "routed/math": 2.5})
    assert eval_finding(good) == ("Routed test loss is below the base's on 2 of 2 domains (chat, math) "
                                  "and below ungated's on 1 of 2 (chat).")
    assert eval_finding(bad) == "Routed test loss is below the base's on 0 of 2 domains and below ungated's on 0 of 2."
    text = eval_section(bad, "eval.png")
    assert "kept the base's general ability" not in text  # no fixed sentence reads as a finding


def test_boost_sentence_follows_the_rounds():
    def section(best):
        rounds = [{"pre_loss": 3.0, "best_loss": b, "stop_reason": "steps", "best_step": 10, "steps_run": 10} for b in best]
        return boost_section({"domain": "chat", "rounds": rounds, "min_improvement": 0.002,
                              "paper": {"note": "round 2 best", "round2_best": 0.8531}})
    assert "Round 2's best (2.0000) is below round 1's (2.5000), a change of -0.5000." in section([2.5, 2.0])
    assert "Round 2's best (2.6000) is above round 1's (2.5000), a change of +0.1000." in section([2.5, 2.6])
    assert "Only one round ran" in section([2.5])


def test_boost_section_sets_the_rounds_beside_the_control():
    rounds = [{"pre_loss": 3.0, "best_loss": b, "stop_reason": "steps", "best_step": 10, "steps_run": 10}
              for b in (2.5, 2.0)]
    b = {"domain": "chat", "rounds": rounds, "min_improvement": 0.002, "paper": {"note": "n", "round2_best": 0.85}}
    worse = boost_section({**b, "control": {"steps": 20, "best_loss": 1.9}})
    assert "trained for the rounds' 20 steps reached 1.9000; boosting's best (2.0000, 2 rounds) is above it (+0.1000)." in worse
    better = boost_section({**b, "control": {"steps": 20, "best_loss": 2.2}})
    assert "boosting's best (2.0000, 2 rounds) is below it (-0.2000)." in better
    assert "control" not in boost_section(b)  # a boost.json written before the control existed


def test_forgetting_sentence_counts_cells_both_here_and_in_the_paper():
    from ministacks.report.paper import PAPER_FORGETTING

    run = {"domains": DOMAINS, "matrix": [[1.0, None], [1.2, 0.9]]}
    f = {"domains": DOMAINS, "runs": {"without": run, "with": run}, "difference": [[0.0, None], [0.05, 0.0]],
         "paper": PAPER_FORGETTING}
    p = PAPER_FORGETTING
    paper_lower = sum(y < x for i, (a, b) in enumerate(zip(p["without null-space"], p["with null-space"]))
                      for j, (x, y) in enumerate(zip(a, b)) if j < i and x is not None)
    text = forgetting_section(f)
    assert f"lowered 0 of the 1 cross-domain (off-diagonal) losses here; in the paper it lowered {paper_lower} of 6." in text


def test_oracle_sentence_names_our_winner_beside_the_papers():
    paper = {"oracle": {"medical": {"chat+math": 32 / 33, "medical": 1 / 33}}}
    same = {"oracle": {"medical": {"n": 10, "shares": {"chat+math": 0.7, "medical": 0.3}}}, "paper": paper}
    other = {"oracle": {"medical": {"n": 10, "shares": {"chat+code+math+medical": 0.6, "base": 0.4}}}, "paper": paper}
    assert "is chat+math (70%), the same winner; chat+math won 70%." in oracle_finding(same)
    assert "is chat+code+math+medical (60%), a different winner; chat+math won 0%." in oracle_finding(other)


def test_every_mode_gets_its_sentence_and_the_exact_accuracy_its_interval():
    e = _eval({"base/math": 3.0, "ungated/math": 2.0, "routed/math": 2.5, "switched/math": 1.5})
    e["domains"], e["modes"] = ["math"], ["base", "ungated", "routed", "switched"]
    e["results"]["switched/math"]["exact"] = {"correct": 30, "n": 100, "by_source": {
        "reasoning-gym:basic_arithmetic": {"correct": 30, "n": 50}, "reasoning-gym:gsm_symbolic": {"correct": 0, "n": 50}}}
    assert eval_finding(e) == ("Routed test loss is below the base's on 1 of 1 domains (math) and below ungated's "
                               "on 0 of 1. Switched test loss is below the base's on 1 of 1 domains (math) and "
                               "below ungated's on 1 of 1 (math).")
    row = next(r for r in eval_table(e) if r.startswith("| math | switched |"))
    # 30 of 100: Wilson's 95% interval is [21.9%, 39.6%]; each generator's share beside the whole
    assert "30% [22%–40%] of 100 (basic_arithmetic 60% [46%–72%] of 50; gsm_symbolic 0% [0%–7%] of 50)" in row


def test_general_text_sentence_follows_the_intervals():
    def vs(low, high):
        return {"difference": (low + high) / 2, "ci95_low": low, "ci95_high": high, "documents": 12}
    e = {"modes": ["base", "ungated", "routed", "switched"],
         "general": {"base": {"loss": 3.0}, "ungated": {"loss": 3.3, "vs_base": vs(0.1, 0.5)},
                     "routed": {"loss": 3.0, "vs_base": vs(-0.01, 0.01)},
                     "switched": {"loss": 2.9, "vs_base": vs(-0.2, -0.01)}}}
    assert general_finding(e) == ("On 12 general held-out documents (paired 95% intervals), measurably above the "
                                  "base's loss: ungated; measurably below it: switched; not measurably different: routed.")
    assert general_table(e)[2] == "| base | 3.0000 | – |"
    assert general_table(e)[3] == "| ungated | 3.3000 | +0.3000 [+0.1000, +0.5000] |"
    assert general_table({}) == [] and "was not measured" in general_finding({"modes": ["base"]})


def test_rl_sentence_counts_the_steps_without_an_update():
    from ministacks.report.rl import rl_section

    measure = {"measure": "accuracy", "accuracy": 0.25, "n": 40, "ci95": [0.14, 0.4], "val_loss": 1.0}
    curve = [{"step": 1, "variance_share": 1 / 3, "update": True}, {"step": 1, "variance_share": 1 / 3, "update": True},
             {"step": 2, "variance_share": 0.0, "update": False}, {"step": 3, "variance_share": 0.0, "update": False}]
    r = {"method": "grpo", "steps_run": 3, "before": measure, "after": {**measure, "accuracy": 0.3}, "curve": curve,
         "guard": None}
    text = rl_section({"domains": {"reasoning": r}}, plot=None)
    assert "11% of the sampled groups had any reward variance" in text  # per step: (1/3 + 0 + 0) / 3
    assert "2 of its 3 steps had none in any group, so made no update" in text
