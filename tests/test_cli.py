"""The command line as a user runs it: `demo`, `pretrain`, `compare`, `boost` on the smoke preset."""

import json

import pytest

from ministacks.__main__ import main


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--preset", "smoke", "--out", str(out), "--no-progress"]) == 0
    return out


def test_demo_writes_a_report_with_every_stage(demo_dir):
    report = (demo_dir / "report.md").read_text()
    for heading in ("## Data", "## Pretraining from random initialisation", "## Experiment 1", "## Residual boosting"):
        assert heading in report
    for figure in ("pretrain_loss.png", "compare.png", "boost.png"):
        assert f"]({figure})" in report and (demo_dir / figure).stat().st_size > 10_000
    assert "unigram entropy" in report
    assert "## Continual domains and null-space projection" in report and "](forgetting.png)" in report


def test_compare_json_has_both_arms_on_the_4bit_base(demo_dir):
    c = json.loads((demo_dir / "compare.json").read_text())
    assert c["quant"] == "nf4"
    for kind in ("moe", "lora"):
        assert c[kind]["params"] > 0 and c[kind]["seconds_per_step"] > 0
        steps = [s for s, _ in c[kind]["val_curve"]]
        assert steps[0] == 0 and steps == sorted(steps)
    assert [s for s, _ in c["moe"]["val_curve"]] == [s for s, _ in c["lora"]["val_curve"]]  # same schedule
    # parameter-matched: within the router/noise rows of each other, as in the paper (53.6M vs 50.5M)
    assert 1.0 < c["moe"]["params"] / c["lora"]["params"] < 1.1


def test_boost_json_records_rounds_and_the_stop_rule(demo_dir):
    b = json.loads((demo_dir / "boost.json").read_text())
    assert 1 <= len(b["rounds"]) <= 2  # the smoke preset allows 2 rounds
    for r in b["rounds"]:
        assert r["best_loss"] <= r["pre_loss"]  # the guard never keeps a stack that made things worse
    # each round starts where the previous one ended
    for prev, nxt in zip(b["rounds"], b["rounds"][1:]):
        assert nxt["pre_loss"] == pytest.approx(prev["best_loss"], abs=1e-5)


def test_demo_again_reuses_everything(demo_dir, capsys):
    before = (demo_dir / "compare.json").read_text()
    assert main(["demo", "--preset", "smoke", "--out", str(demo_dir), "--no-progress"]) == 0
    assert (demo_dir / "compare.json").read_text() == before


def test_user_errors_are_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--preset", "huge", "--out", str(tmp_path)])
    assert "invalid choice" in capsys.readouterr().err


def test_demo_forgetting_json_has_both_runs_and_their_difference(demo_dir):
    f = json.loads((demo_dir / "forgetting.json").read_text())
    assert set(f["runs"]) == {"with null-space", "without null-space"}
    n = len(f["domains"])
    assert len(f["matrix"]) == n and len(f["difference"]) == n
    with_ns, without = f["runs"]["with null-space"]["matrix"], f["runs"]["without null-space"]["matrix"]
    assert f["matrix"] == with_ns
    for i in range(n):
        for j in range(n):
            if j <= i:
                assert f["difference"][i][j] == pytest.approx(with_ns[i][j] - without[i][j])
            else:
                assert f["difference"][i][j] is None
    assert (demo_dir / "subspaces.png").stat().st_size > 10_000
