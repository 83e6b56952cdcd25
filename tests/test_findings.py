"""The findings table: every verdict follows the planted numbers, each way; and boost.json's control.

Every input here is a small hand-made dict with the keys the stages write, planted so that a verdict
has to come out one way: the paper's way, mixed, the reverse way, or not measured at all."""

import json
from dataclasses import replace

import pytest

import ministacks.stages.boost as boost_stage
from ministacks.io import atomic_write_json
from ministacks.presets import SMOKE
from ministacks.report.findings import (boosting, control_sentence, exp1_checkpoints, exp1_final_gap,
                                        findings_rows, findings_section, general_text, nullspace, oracle, routing,
                                        verdict)

# -- the rule ------------------------------------------------------------------------------------------


def test_verdict_rules():
    assert verdict(3, 0, 3, "every") == "reproduced"
    assert verdict(2, 1, 3, "every") == "not reproduced"  # most, not all
    assert verdict(0, 3, 3, "every") == "opposite"
    assert verdict(2, 0, 3, "every") == "not reproduced"  # a tie is neither way
    assert verdict(2, 1, 3, "majority") == "reproduced"
    assert verdict(1, 1, 2, "majority") == "not reproduced"  # half is no majority
    assert verdict(1, 2, 3, "majority") == "opposite"
    assert verdict(0, 0, 0, "majority") == verdict(0, 0, 0, "every") == "not measured"
    with pytest.raises(ValueError, match="unknown verdict rule"):
        verdict(1, 0, 1, "most")


# -- planted inputs ------------------------------------------------------------------------------------


def _compare(moe: list[float], lora: list[float], **extra) -> dict:
    """compare.json with checkpoints every 10 steps; step 0 is planted with MoE far below, to be ignored."""
    def curve(losses, start):
        return [[0, start]] + [[10 * (i + 1), v] for i, v in enumerate(losses)]
    return {"quant": "nf4", "moe": {"params": 100, "val_curve": curve(moe, 1.0), "final": moe[-1]},
            "lora": {"params": 90, "val_curve": curve(lora, 9.0), "final": lora[-1]}, **extra}


def _boost(best: list[float], control: float | None = None) -> dict:
    b = {"domain": "chat", "min_improvement": 0.002,
         "rounds": [{"pre_loss": 3.0, "best_loss": v, "steps_run": 10} for v in best]}
    if control is not None:
        b["control"] = {"steps": 10 * len(best), "steps_run": 10 * len(best), "best_loss": control,
                        "val_curve": [[0, 3.0], [10 * len(best), control]], "stop_reason": "steps"}
    return b


def _forgetting(below_with: list[float], below_without: list[float], diagonal=(1.0, 5.0, 1.0)) -> dict:
    """Two 3-domain runs whose three below-diagonal cells are planted; the diagonal goes against them."""
    def matrix(cells, diag):
        a, b, c = cells
        return [[diag[0], None, None], [a, diag[1], None], [b, c, diag[2]]]
    return {"domains": ["chat", "code", "math"],
            "runs": {"with null-space": {"matrix": matrix(below_with, diagonal)},
                     "without null-space": {"matrix": matrix(below_without, diagonal[::-1])}}}


def _router(shares: dict, n: int) -> dict:
    return {"domains": ["chat", "math", "medical"], "search": "exhaustive",
            "oracle": {"medical": {"n": n, "shares": shares}}}


def _eval(losses: dict[str, tuple[float, float, float]]) -> dict:
    """eval.json from {domain: (base, ungated, routed) test loss}."""
    modes = ("base", "ungated", "routed")
    results = {f"{m}/{d}": {"loss": v} for d, trio in losses.items() for m, v in zip(modes, trio)}
    return {"domains": list(losses), "config": {"n_loss": 10}, "results": results}


# -- one row, each verdict ----------------------------------------------------------------------------

@pytest.mark.parametrize("moe, lora, expected, n", [
    ([3.0, 2.0], [3.5, 2.5], "reproduced", 2),
    ([3.0, 2.6], [3.5, 2.5], "not reproduced", 2),
    ([3.0, 2.5], [3.5, 2.5], "not reproduced", 2),  # a tie at one checkpoint: not every one
    ([3.6, 2.6], [3.5, 2.5], "opposite", 2),  # step 0 (MoE planted far below there) is no checkpoint
])
def test_exp1_checkpoints(moe, lora, expected, n):
    row = exp1_checkpoints(_compare(moe, lora))
    assert (row["verdict"], row["n"]) == (expected, n)


def test_exp1_without_both_arms_is_not_measured():
    assert exp1_checkpoints(None)["verdict"] == "not measured"
    c = _compare([3.0], [3.5])
    del c["lora"]
    assert exp1_checkpoints(c)["verdict"] == exp1_final_gap(c)["verdict"] == "not measured"
    assert exp1_checkpoints(c)["ours"] == "not recorded"


@pytest.mark.parametrize("final_moe, expected", [(2.4, "reproduced"), (2.5, "not reproduced"), (2.6, "opposite")])
def test_exp1_final_gap(final_moe, expected):
    row = exp1_final_gap(_compare([3.0, final_moe], [3.5, 2.5]))
    assert row["verdict"] == expected
    assert row["ours"].endswith(f"= {final_moe - 2.5:+.4f}")


def test_paper_column_is_computed_from_the_papers_numbers():
    paper = {"steps": [5, 10, 15], "moe": [1.0, 2.0, 1.0], "lora": [1.5, 1.5, 1.5], "params": {"moe": 2e6, "lora": 2e6}}
    c = _compare([3.0], [3.5], paper=paper)
    assert exp1_checkpoints(c)["paper"] == "2 of 3 checkpoints"
    assert exp1_final_gap(c)["paper"] == "1.0000 − 1.5000 = -0.5000"


@pytest.mark.parametrize("best, expected", [
    ([2.5, 2.0], "reproduced"), ([2.5, 2.5], "not reproduced"), ([2.5, 2.6], "opposite"), ([2.5], "not measured"),
])
def test_boosting(best, expected):
    assert boosting(_boost(best))["verdict"] == expected
    assert "control not run" in boosting(_boost(best))["ours"]


def test_boosting_control_is_reported_beside_the_rounds_not_in_the_verdict():
    b = _boost([2.5, 2.0], control=1.9)  # the one long stack does better than the two rounds
    row = boosting(b)
    assert row["verdict"] == "reproduced"  # the paper's finding (round 2 below round 1) still holds
    assert "control, one stack for 20 steps: 1.9000 (boosting above it)" in row["ours"]
    assert "boosting's best (2.0000, 2 rounds) is above it (+0.1000)" in control_sentence(b)
    assert "below it (-0.1000)" in control_sentence(_boost([2.5, 2.0], control=2.1))
    assert "was not run" in control_sentence(_boost([2.5, 2.0]))
    assert boosting(None)["verdict"] == "not measured"


@pytest.mark.parametrize("with_ns, without_ns, expected, ours", [
    ([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], "reproduced", "lower in 3 of 3 cells"),
    ([1.0, 1.0, 3.0], [2.0, 2.0, 2.0], "reproduced", "lower in 2 of 3 cells (higher in 1)"),  # a majority
    ([1.0, 2.0, 3.0], [2.0, 2.0, 2.0], "not reproduced", "lower in 1 of 3 cells (higher in 1)"),
    ([3.0, 3.0, 1.0], [2.0, 2.0, 2.0], "opposite", "lower in 1 of 3 cells (higher in 2)"),
])
def test_nullspace(with_ns, without_ns, expected, ours):
    row = nullspace(_forgetting(with_ns, without_ns))
    assert (row["verdict"], row["ours"], row["n"]) == (expected, ours, 3)


def test_nullspace_with_one_run_says_the_comparison_was_not_run():
    f = _forgetting([1.0] * 3, [2.0] * 3)
    del f["runs"]["without null-space"]
    row = nullspace(f)
    assert row["verdict"] == "not measured" and row["ours"] == "comparison not run"
    assert "the comparison was not run" in row["note"]


def test_nullspace_paper_count_follows_the_papers_matrices():
    paper = {"domains": ["a", "b"], "with null-space": [[None, None], [1.0, 0.5]],
             "without null-space": [[None, None], [2.0, 0.1]]}  # one cell below the diagonal, lowered
    f = {**_forgetting([1.0] * 3, [2.0] * 3), "paper": paper}
    assert nullspace(f)["paper"] == "lower in 1 of 1 cells"


@pytest.mark.parametrize("shares, expected", [
    ({"chat+math": 0.6, "medical": 0.4}, "reproduced"),
    ({"math": 0.4, "chat+math": 0.3, "medical": 0.3}, "not reproduced"),
    ({"medical": 0.7, "chat+math": 0.3}, "opposite"),
])
def test_oracle(shares, expected):
    row = oracle(_router(shares, 10))
    assert (row["verdict"], row["n"]) == (expected, 10)
    assert f"chat+math on {round(shares['chat+math'] * 10)} of 10" in row["ours"]


def test_oracle_without_medical_prompts_is_not_measured_and_the_papers_winner_is_read():
    assert oracle(_router({}, 0))["verdict"] == oracle(None)["verdict"] == "not measured"
    r = {**_router({"code": 0.8, "medical": 0.2}, 5), "paper": {"oracle": {"medical": {"code": 2 / 3, "math": 1 / 3}}},
         "domains": ["chat", "code", "medical"]}
    row = oracle(r)
    assert row["paper"] == "code on 2 of 3 medical prompts (67%)"
    assert row["verdict"] == "reproduced" and "code on 4 of 5" in row["ours"]


def test_the_oracle_is_not_measured_where_the_papers_winner_has_no_stacks():
    row = oracle({**_router({"chat+code": 0.9, "medical": 0.1}, 10), "domains": ["chat", "code", "medical"]})
    assert row["verdict"] == "not measured" and "no math stacks" in row["note"]


@pytest.mark.parametrize("losses, expected", [
    ({"chat": (3.0, 2.5, 2.0), "math": (3.0, 2.5, 2.0), "code": (3.0, 2.0, 2.5)}, "reproduced"),
    ({"chat": (3.0, 2.0, 2.5), "math": (3.0, 2.0, 2.5), "code": (3.0, 2.0, 2.5)}, "not reproduced"),  # between
    ({"chat": (2.0, 2.5, 3.0), "math": (2.0, 2.5, 3.0), "code": (3.0, 2.5, 2.0)}, "opposite"),
])
def test_routing(losses, expected):
    assert routing(_eval(losses))["verdict"] == expected


def test_routing_counts_only_domains_in_all_three_modes_and_reads_the_papers_table():
    e = _eval({"chat": (3.0, 2.5, 2.0), "math": (3.0, 2.5, 2.0)})
    del e["results"]["routed/math"]
    e["paper_table4"] = {"A": (0.5, 0.6), "B": (0.5, 0.5), "C": (0.5, 0.4)}
    row = routing(e)
    assert (row["verdict"], row["n"]) == ("reproduced", 1)
    assert row["paper"].startswith("routed ≥ base on 2 of 3 benchmarks")
    del e["results"]["routed/chat"]
    assert routing(e)["verdict"] == "not measured"


@pytest.mark.parametrize("low, high, expected", [
    (-0.02, 0.01, "reproduced"),  # not measurably above the base
    (-0.05, -0.01, "reproduced"),  # measurably below it
    (0.001, 0.03, "opposite"),  # measurably above it
])
def test_general_text(low, high, expected):
    vs = {"difference": (low + high) / 2, "ci95_low": low, "ci95_high": high, "documents": 40}
    e = {"general": {"base": {"loss": 3.0}, "routed": {"loss": 3.0, "vs_base": vs},
                     "ungated": {"loss": 3.2, "vs_base": {**vs, "difference": 0.2}}},
         "paper_table4": {"MMLU": (0.450, 0.435), "ARC-Easy": (0.510, 0.515), "GSM8K": (0.665, 0.6)}}
    row = general_text(e)
    assert (row["verdict"], row["n"]) == (expected, 1)
    # GSM8K is math's benchmark, not a general one: the paper's cell counts the other two only
    assert row["paper"].startswith("routed at most 1.5 points below base on its 2 general benchmarks (MMLU, ARC-Easy")
    assert "ungated − base +0.2000" in row["ours"] and "40 held-out documents" in row["note"]
    assert general_text({"results": {}})["verdict"] == general_text(None)["verdict"] == "not measured"


# -- the section ---------------------------------------------------------------------------------------

def test_section_has_one_row_per_finding_and_a_sentence_for_each_not_reproduced():
    c = _compare([3.6, 2.6], [3.5, 2.5], base_params=12_345,
                 adapter={"n_experts": 4, "r": 2, "top_k": 2, "lora_r": 7})
    inputs = (c, _boost([2.5, 2.0], control=2.2), _forgetting([1.0] * 3, [2.0] * 3),
              _router({"medical": 0.7, "chat+math": 0.3}, 10), None)
    rows = findings_rows(*inputs)
    assert [r["verdict"] for r in rows] == ["opposite", "opposite", "reproduced", "reproduced", "opposite",
                                            "not measured", "not measured"]
    text = findings_section(*inputs)
    table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| finding")]
    assert [line.split(" | ")[3] for line in table] == [r["verdict"] for r in rows]
    # Exp 1's setting once for both of its rows, from what compare.json records
    assert "- 1, 2. Exp 1 here: a 12,345-parameter base (nf4), MoE-LoRA 4 × r2 top-2 against LoRA r7" in text
    assert "- 5. The oracle here: 10 medical prompts" in text and "- 6, 7. Not measured here: no eval.json." in text
    assert "- 3." not in text and "- 4." not in text  # reproduced: no sentence
    assert "boosting's best (2.0000, 2 rounds) is below it (-0.2000)" in text


def test_older_files_without_the_new_keys_say_so():
    text = findings_section(_compare([3.6], [3.5]), _boost([2.5, 2.6]), None, None, None)
    assert "a base of unrecorded size" in text and "adapter shapes not recorded" in text
    assert "The control (one stack trained for as many steps as all the boosting rounds) was not run." in text


# -- boost.json's control, on the smoke base ---------------------------------------------------------

class Killed(Exception):
    pass


def test_boost_control_trains_as_long_as_the_rounds_and_resumes_alone(tmp_path, monkeypatch):
    preset = replace(SMOKE, stack=replace(SMOKE.stack, steps=2, eval_every=2, max_val_examples=8))
    path = tmp_path / "boost.json"
    real_round = boost_stage.train_round

    def killed(*a, **k):
        raise Killed

    # a kill during the control: the rounds are on disk already
    monkeypatch.setattr(boost_stage, "train_round", killed)
    with pytest.raises(Killed):
        boost_stage.run_boost(preset, tmp_path, progress=False)
    rounds = json.loads(path.read_text())
    assert "control" not in rounds and len(rounds["rounds"]) == SMOKE.boost.max_rounds
    total = sum(r["steps_run"] for r in rounds["rounds"])

    # the rerun trains the control only, for the rounds' total steps
    steps = []

    def recording(model, make, train, val_loss, cfg, **kw):
        steps.append(cfg.steps)
        return real_round(model, make, train, val_loss, cfg, **kw)

    monkeypatch.undo()
    monkeypatch.setattr(boost_stage, "boost_domain", lambda *a, **k: pytest.fail("the rounds were trained again"))
    monkeypatch.setattr(boost_stage, "train_round", recording)
    b = boost_stage.run_boost(preset, tmp_path, progress=False)
    assert steps == [total] and total == 2 * len(rounds["rounds"])
    assert b["rounds"] == rounds["rounds"]
    c = b["control"]
    assert c["steps"] == total and c["val_curve"][-1][0] == c["steps_run"] <= total
    # stack 0 on a fresh base, like round 1: its seed, and the same loss before training
    assert c["seed"] == rounds["rounds"][0]["seed"]
    assert c["val_curve"][0][1] == pytest.approx(rounds["rounds"][0]["pre_loss"], abs=1e-5)
    assert json.loads(path.read_text()) == json.loads(json.dumps(b))

    # a boost.json with the control is the result: nothing trains
    monkeypatch.setattr(boost_stage, "train_round", killed)
    assert boost_stage.run_boost(preset, tmp_path, progress=False) == json.loads(path.read_text())
    atomic_write_json(path, {**b, "control": {**c, "best_loss": -1.0}})  # planted: read back, not recomputed
    assert boost_stage.run_boost(preset, tmp_path, progress=False)["control"]["best_loss"] == -1.0
