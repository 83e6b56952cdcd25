"""The one timing loop of the benchmarks (ministacks/bench/timing.py), on planted times, and the benchmarks
that use it in their smallest form.

The loop reads time from an injectable clock; here a fake one that moves only when a variant says how long
it took, so every assertion is about exact, planted numbers. Nothing here asserts that anything is fast."""

import argparse
import functools
import json

import pytest
import torch

from ministacks.bench import command, moe, nullspace, pretrain
from ministacks.bench.timing import (
    LOAD_WARNING,
    SPREAD_WARNING,
    Timings,
    busy_machine,
    median,
    time_interleaved,
)
from ministacks.lm.model import ModelConfig

TINY = ModelConfig(vocab_size=97, n_layer=1, d_model=64, n_head=4, n_kv_head=2, max_seq_len=32)


class FakeClock:
    """A clock that stands still until a variant advances it by its planted duration."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def planted(clock: FakeClock, log: list, name: str, durations: list[float]):
    """A variant that logs its call and takes the next of `durations` seconds; returns the call's index."""
    calls = iter(range(len(durations)))

    def run():
        i = next(calls)
        log.append(name)
        clock.advance(durations[i])
        return i

    return run


# -- the loop ---------------------------------------------------------------------------------------------


def test_every_variant_is_timed_the_asked_rounds_after_untimed_warmup():
    clock, log = FakeClock(), []
    # warm-up runs take 100 s: if one were counted, a median or a fastest would show it
    fns = {"a": planted(clock, log, "a", [100, 100, 3, 1, 2]),
           "b": planted(clock, log, "b", [100, 100, 5, 7, 6])}
    t = time_interleaved(fns, rounds=3, warmup=2, clock=clock)
    assert log == ["a", "b"] * 5  # interleaved: a, b, a, b, ...
    assert t.rounds == 3
    assert t.seconds == {"a": [3, 1, 2], "b": [5, 7, 6]}  # in the order they ran
    assert t.median == {"a": 2, "b": 6}
    assert t.fastest == {"a": 1, "b": 5}
    assert t.spread == {"a": 2.0, "b": 6 / 5}


def test_median_of_an_even_count_is_the_upper_middle_run():
    assert median([4.0, 1.0, 3.0, 2.0]) == 3.0
    assert median([5.0]) == 5.0
    t = Timings({"x": [4.0, 1.0, 3.0, 2.0]}, {})
    assert t.median == {"x": 3.0} and t.fastest == {"x": 1.0} and t.spread == {"x": 3.0}
    with pytest.raises(ValueError, match="at least one round"):
        median([])


def test_budget_counts_the_warmup_and_keeps_min_rounds():
    def rounds_run(budget_s, warmup=0, rounds=100, min_rounds=3):
        clock = FakeClock()
        # two variants of 1 s each: a round takes 2 s of the fake clock
        fns = {k: planted(clock, [], k, [1.0] * (warmup + rounds)) for k in ("a", "b")}
        return time_interleaved(fns, rounds=rounds, warmup=warmup, budget_s=budget_s, min_rounds=min_rounds,
                                clock=clock).rounds

    assert rounds_run(budget_s=None, rounds=7) == 7  # no budget: every round asked for
    assert rounds_run(budget_s=5.0) == 3  # 2, 4, 6 s: over the budget after the 3rd round
    assert rounds_run(budget_s=9.0) == 5  # 10 s > 9 after the 5th
    # the warm-up round's 2 s count against the budget: 4, 6, 8, 10 s after timed rounds 1..4
    assert rounds_run(budget_s=9.0, warmup=1) == 4
    # past the budget from the first round on: still min_rounds timed rounds, never more than asked
    assert rounds_run(budget_s=0.0) == 3
    assert rounds_run(budget_s=0.0, min_rounds=1) == 1
    assert rounds_run(budget_s=0.0, rounds=2) == 2


def test_rotate_starts_each_round_at_the_next_variant():
    clock, log = FakeClock(), []
    fns = {k: planted(clock, log, k, [1.0] * 4) for k in "abc"}
    t = time_interleaved(fns, rounds=3, warmup=1, rotate=True, clock=clock)
    assert log == list("abc" "bca" "cab" "abc")  # the warm-up round is round 0 of the rotation
    assert t.rounds == 3


def test_prepare_runs_before_each_run_outside_its_timing():
    clock, log = FakeClock(), []
    fns = {"a": planted(clock, log, "a", [1.0] * 3), "b": planted(clock, log, "b", [2.0] * 3)}

    def switch():
        log.append("switch")
        clock.advance(50.0)  # slow, and not part of b's time

    t = time_interleaved(fns, rounds=2, warmup=1, prepare={"b": switch}, clock=clock)
    assert log == ["a", "switch", "b"] * 3
    assert t.seconds == {"a": [1.0, 1.0], "b": [2.0, 2.0]}


def test_keep_holds_the_timed_runs_results_of_the_kept_variants_only():
    clock = FakeClock()
    fns = {"a": planted(clock, [], "a", [1.0] * 4), "b": planted(clock, [], "b", [1.0] * 4)}
    t = time_interleaved(fns, rounds=3, warmup=1, keep=("b",), clock=clock)
    assert t.results == {"b": [1, 2, 3]}  # call 0 was the warm-up


def test_bad_arguments_name_the_problem():
    fns = {"a": lambda: None}
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        time_interleaved(fns, rounds=0)
    with pytest.raises(ValueError, match="not timed: \\['c'\\]"):
        time_interleaved(fns, rounds=1, keep=("c",))
    with pytest.raises(ValueError, match="not timed: \\['d'\\]"):
        time_interleaved(fns, rounds=1, prepare={"d": lambda: None})
    with pytest.raises(ValueError, match="no variants"):
        time_interleaved({}, rounds=1)


def test_the_real_clock_measures_something():
    t = time_interleaved({"sum": lambda: sum(range(1000))}, rounds=2, keep=("sum",))
    assert t.rounds == 2 and all(s > 0 for s in t.seconds["sum"])
    assert t.results["sum"] == [499500, 499500]


# -- the busy-machine warning ------------------------------------------------------------------------------


def test_busy_machine_triggers_on_a_planted_spread_or_load():
    quiet = busy_machine([1.0, 1.1, SPREAD_WARNING], load=LOAD_WARNING)
    assert quiet.spread is None and quiet.load is None  # at the thresholds: fine
    assert busy_machine([1.0, 1.6, 1.3]).spread == 1.6  # the worst variant is reported
    assert busy_machine([1.0], load=2.5).load == 2.5
    assert busy_machine([1.0], load=None).load is None  # an OS without a load average
    assert busy_machine([]).spread is None


# -- the benchmarks, smallest form: they run, are JSON, and word the warning ---------------------------------


def test_bench_pretrain_smallest(monkeypatch):
    # the matmul probe at a toy size: its default 2048 x 2048 products take seconds
    monkeypatch.setattr(pretrain, "matmul_gflops", functools.partial(pretrain.matmul_gflops, sizes=(64,), repeats=1))
    d = pretrain.bench_pretrain(TINY, batch_size=2, seq_len=16, steps=2, warmup=1)
    json.dumps(d)
    assert d["steps"] == 2 and d["tokens_per_second"] > 0 and d["matmul_gflops"] > 0
    assert d["best_tokens_per_second"] >= d["tokens_per_second"]
    assert 0 < d["final_loss"] < 10
    text = pretrain.format_bench_pretrain(d)
    assert "2 timed steps" in text and "MFU" in text


def test_bench_moe_smallest_and_its_warning():
    d = moe.bench_moe(TINY, batch_size=2, seq_len=16, steps=2, warmup=1)
    json.dumps(d)
    assert d["rounds"] == 2 and set(d["seconds"]) == set(moe.VARIANTS) == set(d["spread"])
    assert set(d["ratios"]) == {"moe/lora", "naive/lora", "lora/base"}
    assert all(s >= 1.0 for s in d["spread"].values())
    d["spread"] = {k: 1.0 for k in moe.VARIANTS}
    assert "warning" not in moe.format_bench_moe(d)
    d["spread"]["naive"] = 1.8
    assert "warning   median steps up to 1.80x the fastest" in moe.format_bench_moe(d)


def test_bench_nullspace_smallest_and_its_warning():
    s = nullspace.bench_step_overhead(batch_size=1, seq_len=8, k=4, steps=1)
    v = nullspace.bench_svd(n=40, d=96, k=8, reps=2)
    d = dict(step=s, svd=v, threads=torch.get_num_threads())
    json.dumps(d)
    assert s["rounds"] == 1 and set(s["seconds"]) == set(nullspace.VARIANTS)
    assert set(s["overhead"]) == {"forward", "strict"}
    assert set(v["seconds"]) == {"full", "randomized", "svd_lowrank"}
    assert v["accuracy"]["randomized"]["error_ratio"] >= 1 - 1e-5  # the full SVD's top-k is optimal
    s["spread"] = {k: 1.0 for k in nullspace.VARIANTS}
    assert "warning" not in nullspace.format_bench_nullspace(d)
    s["spread"]["strict"] = 2.0
    assert "warning   median steps well above the fastest" in nullspace.format_bench_nullspace(d)


# -- the command -------------------------------------------------------------------------------------------


def test_command_parses_and_prints_json_or_text(monkeypatch, capsys):
    parser = argparse.ArgumentParser()
    command.add_args(parser)
    assert command.HELP == "speed measurements"
    with pytest.raises(SystemExit):
        parser.parse_args(["gpu"])  # not a benchmark

    from ministacks.bench import nf4

    planted_result = {"planted": 1}
    monkeypatch.setattr(nf4, "bench_nf4", lambda: planted_result)
    monkeypatch.setattr(nf4, "format_bench_nf4", lambda d: f"formatted {d['planted']}")
    assert command.main(parser.parse_args(["nf4", "--json"])) == 0
    assert json.loads(capsys.readouterr().out) == planted_result
    assert command.main(parser.parse_args(["nf4"])) == 0
    assert capsys.readouterr().out == "formatted 1\n"
