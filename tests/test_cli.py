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
    assert "## PSN v1" in report and "## PSN v2" in report and "](psn.png)" in report  # the short PSN stage


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


def test_compare_at_a_length_of_its_own_keeps_the_presets_comparison(demo_dir, capsys):
    before = (demo_dir / "compare.json").read_text()
    assert main(["compare", "--preset", "smoke", "--out", str(demo_dir), "--steps", "16", "--no-progress"]) == 0
    assert (demo_dir / "compare.json").read_text() == before
    c = json.loads((demo_dir / "compare_16.json").read_text())
    assert c["steps"] == 16 and (demo_dir / "compare_16.png").is_file()
    # the paper's schedule: 8 checkpoints, evenly spaced, both arms on the same ones
    for kind in ("moe", "lora"):
        assert [s for s, _ in c[kind]["val_curve"]] == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    out = capsys.readouterr().out
    assert "16 steps: MoE-LoRA below LoRA at " in out and " of 8 checkpoints" in out
    assert main(["compare", "--preset", "smoke", "--out", str(demo_dir), "--steps", "4", "--no-progress"]) == 2
    assert "error: --steps 4: Exp 1 needs at least 8 steps" in capsys.readouterr().err


def test_boost_json_records_rounds_and_the_stop_rule(demo_dir):
    b = json.loads((demo_dir / "boost.json").read_text())
    assert 1 <= len(b["rounds"]) <= 2  # the smoke preset allows 2 rounds
    for r in b["rounds"]:
        assert r["best_loss"] <= r["pre_loss"]  # the guard never keeps a stack that made things worse
    # each round starts where the previous one ended
    for prev, nxt in zip(b["rounds"], b["rounds"][1:]):
        assert nxt["pre_loss"] == pytest.approx(prev["best_loss"], abs=1e-5)
    # the control: one fresh stack (stack 0, like round 1) trained for as many steps as all the rounds ran
    c = b["control"]
    assert c["steps"] == sum(r["steps_run"] for r in b["rounds"])
    assert c["val_curve"][0] == [0, pytest.approx(b["rounds"][0]["pre_loss"], abs=1e-5)]  # the same fresh base
    assert c["val_curve"][-1][0] == c["steps_run"] <= c["steps"]
    assert c["best_loss"] <= c["val_curve"][0][1] and c["stop_reason"] in ("steps", "spike", "patience")
    assert c["seconds_per_step"] > 0


def test_demo_again_reuses_everything(demo_dir, capsys):
    before = (demo_dir / "compare.json").read_text()
    ledger = json.loads((demo_dir / "stage_times.json").read_text())
    assert len(ledger["seconds"]) == 9 and all(s > 0 for s in ledger["seconds"].values())
    assert main(["demo", "--preset", "smoke", "--out", str(demo_dir), "--no-progress"]) == 0
    assert (demo_dir / "compare.json").read_text() == before
    # the stage times add this invocation's (reading what is done) to the first's, and the report shows both
    again = json.loads((demo_dir / "stage_times.json").read_text())
    assert again["invocations"] == ledger["invocations"] + 1
    assert again["seconds"].keys() == ledger["seconds"].keys()
    assert all(again["seconds"][k] > ledger["seconds"][k] for k in ledger["seconds"])
    report = (demo_dir / "report.md").read_text()
    assert f"seconds, all {again['invocations']} invocation(s)" in report
    total = sum(again["seconds"].values())
    assert f"| **{total:.0f}** |" in report


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


# -- the meta-router, routed inference and the three-mode evaluation (on the demo's null-space run) ------


def test_demo_report_has_the_router_and_the_evaluation_in_every_mode(demo_dir):
    report = (demo_dir / "report.md").read_text()
    assert "## Meta-router" in report and "](nullspace/router.png)" in report
    assert "## Base, ungated, routed and switched" in report and "](nullspace/eval.png)" in report
    assert "General held-out text" in report and "| switched |" in report
    assert "### The same prompts in every mode" in report and "*routed* (" in report and "*switched* (" in report
    for figure in ("router.png", "eval.png"):
        assert (demo_dir / "nullspace" / figure).stat().st_size > 10_000


def test_router_json_scores_and_oracle_shares(demo_dir):
    r = json.loads((demo_dir / "nullspace" / "router.json").read_text())
    assert 0.0 <= r["single_top1"] <= 1.0 and 0.0 <= r["mixed_set_match"] <= 1.0
    assert set(r["oracle"]) == set(r["domains"])
    total = 0
    for d, o in r["oracle"].items():
        total += o["n"]
        if o["n"]:
            assert sum(o["shares"].values()) == pytest.approx(1.0)
            assert all(c == "base" or set(c.split("+")) <= set(r["domains"]) for c in o["shares"])
    assert total == r["n_prompts"]["single"]
    assert r["n_prompts"]["train"] + r["n_prompts"]["val"] == r["n_prompts"]["single"] + r["n_prompts"]["mixed"]
    assert (demo_dir / "nullspace" / "router" / "model.safetensors").is_file()


def test_eval_json_has_every_mode_and_domain(demo_dir):
    e = json.loads((demo_dir / "nullspace" / "eval.json").read_text())
    modes = ("base", "ungated", "routed", "switched")
    assert tuple(e["modes"]) == modes
    for mode in modes:
        for d in e["domains"]:
            res = e["results"][f"{mode}/{d}"]
            assert res["loss"] > 0
            # nothing checkable in chat; elsewhere an accuracy wherever a prompt left room to answer
            assert (res["accuracy"] is None) == (d == "chat" or res["n_generated"] == 0)
            # the exact check: every domain whose test examples have answers (math, reasoning, medical's ICD)
            assert ("exact" in res) == (d in ("math", "medical", "reasoning"))
            if "exact" in res:
                assert 0 <= res["exact"]["correct"] <= res["exact"]["n"] <= e["config"]["n_exact"]
        # the general held-out text, in every mode, on the same documents
        assert e["general"][mode]["loss"] > 0
        assert e["general"][mode]["tokens"] == e["general"]["base"]["tokens"]
        assert ("vs_base" in e["general"][mode]) == (mode != "base")
    assert any(e["results"][f"routed/{d}"]["accuracy"] is not None for d in e["domains"])
    # the modes really differ: stacks change the loss
    assert e["results"]["base/code"]["loss"] != e["results"]["ungated/code"]["loss"]
    assert e["general"]["base"]["loss"] != e["general"]["ungated"]["loss"]
    assert {s["label"] for s in e["samples"]} >= set(e["domains"])
    assert all(set(s["answers"]) == set(modes) for s in e["samples"])


def test_eval_resumes_only_what_is_missing(demo_dir):
    from ministacks.stages.evaluate import eval_stage

    path = demo_dir / "nullspace" / "eval.json"
    e = json.loads(path.read_text())
    del e["results"]["routed/math"]
    path.write_text(json.dumps(e))
    again = eval_stage(demo_dir, "smoke", progress=False)
    assert "routed/math" in again["results"]
    assert again["seconds"]["base/chat"] == e["seconds"]["base/chat"]  # not recomputed


def test_evals_cache_key_ignores_the_harness_settings(demo_dir):
    from dataclasses import replace

    from ministacks.presets import HarnessConfig
    from ministacks.run import load_run
    from ministacks.stages.common import eval_key

    sr = load_run(demo_dir, "smoke")
    cfg = sr.preset.eval
    assert eval_key(sr, replace(cfg, harness=HarnessConfig(n_choice=3, n_gsm=1))) == eval_key(sr, cfg)
    assert eval_key(sr, replace(cfg, n_exact=cfg.n_exact + 1)) != eval_key(sr, cfg)


def test_route_again_reuses_the_cached_targets(demo_dir):
    targets = demo_dir / "nullspace" / "router" / "targets.json"
    before = targets.stat().st_mtime_ns
    assert main(["route", "--run", str(demo_dir), "--no-progress"]) == 0
    assert targets.stat().st_mtime_ns == before


def test_generate_in_every_mode_and_with_forced_weights(demo_dir, capsys):
    assert main(["generate", "--run", str(demo_dir), "--prompt", "What is 2 + 3?", "--mode", "compare",
                 "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "[base: base (every stack off)]" in out and "[ungated: ungated" in out and "[routed: " in out
    assert main(["generate", "--run", str(demo_dir), "--prompt", "hi", "--weights", "math=1", "--max-new-tokens", "4"]) == 0
    assert "[forced: math 1.00]" in capsys.readouterr().out
    assert main(["generate", "--run", str(demo_dir), "--prompt", "hi", "--weights", "math"]) == 2
    assert "domain=number" in capsys.readouterr().err
    assert main(["generate", "--run", str(demo_dir), "--prompt", "hi", "--weights", "law=1"]) == 2


def test_chat_session(demo_dir, capsys, monkeypatch):
    lines = iter(["/route How many legs does a spider have?", "/force code=1", "def add(a, b):", "/force off",
                  "/mode ungated", "/mode nonsense", "/compare hello", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr("sys.argv", ["ministacks"])
    assert main(["chat", "--run", str(demo_dir), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "p: chat" in out and "weights: " in out
    assert "[forced: code 1.00]" in out
    assert "error: unknown mode 'nonsense'" in out
    assert "[base: base (every stack off)]" in out and "[routed: " in out


def test_routed_generation_one_hot_equals_only_that_domains_stacks(demo_dir):
    """Weights one-hot on a domain skip every other domain: the answer is that of a model holding
    only that domain's stacks."""
    import torch

    from ministacks.data import render_alpaca
    from ministacks.run import load_run, prepared_base
    from ministacks.stacks.layer import StacksOn, stacks_on
    from ministacks.stacks.store import load_stack
    from ministacks.stacks.manifest import read_manifest

    sr = load_run(demo_dir)
    prompt = "Write a Python function `add(a, b)` that does the following."
    got = sr.generate(prompt, {"code": 1.0}, max_new_tokens=12, repetition_penalty=1.0)["completion"]
    model, tok = prepared_base(sr.preset, sr.paths.out)
    for s in read_manifest(sr.paths.run)["stacks"]:
        if s["domain"] == "code":
            load_stack(sr.paths.run, model, "code", s["round"])
    ids = tok.encode(render_alpaca(prompt, ""), bos=True)
    out = model.generate(torch.tensor([ids]), 12, eos_id=tok.eos_id)
    assert got == tok.decode([t for t in out[0, len(ids):].tolist() if t != tok.eos_id])
    # and the logits agree exactly, while with every stack on they differ (the skipped stacks matter)
    x = torch.tensor([ids])
    with stacks_on(sr.model, sr.stacks_for({"code": 1.0})):
        routed_logits = sr.model(x).logits
    with stacks_on(sr.model, StacksOn.ungated()):
        ungated_logits = sr.model(x).logits
    assert torch.allclose(routed_logits, model(x).logits, atol=1e-5)
    assert not torch.allclose(ungated_logits, routed_logits, atol=1e-3)


def test_caches_follow_the_stacks_content_not_their_names(demo_dir, tmp_path):
    """Retraining a stack into the same folder (same name, new tensors) must never reuse the oracle's
    targets or eval.json's numbers of the old stack; nor may a retrained router reuse eval.json."""
    import shutil

    import torch

    from ministacks.stages.common import eval_key
    from ministacks.io import read_json
    from ministacks.routing.router import save_router
    from ministacks.run import load_run
    from ministacks.stacks.layer import stacked_layers
    from ministacks.stacks.store import save_stack
    from ministacks.stacks.manifest import read_manifest

    run = tmp_path / "demo"
    shutil.copytree(demo_dir, run)
    sr = load_run(run)
    old_eval_key = eval_key(sr, sr.preset.eval)
    targets_key = read_json(run / "nullspace" / "router" / "targets.json")["key"]
    # "retrain" code_r01: new tensors, saved exactly as train saves a stack, under the same name
    entry = next(s for s in read_manifest(sr.paths.run)["stacks"] if s["domain"] == "code" and s["round"] == 1)
    with torch.no_grad():
        for layer in stacked_layers(sr.model):
            layer.stacks["code"][0].lora_B.add_(0.01)
    save_stack(sr.paths.run, sr.model, "code", 1, "moe", sr.preset.adapter, meta=entry, index=0)
    assert main(["route", "--run", str(run), "--no-progress"]) == 0
    assert read_json(run / "nullspace" / "router" / "targets.json")["key"] != targets_key  # recomputed
    sr = load_run(run)
    assert eval_key(sr, sr.preset.eval) != old_eval_key
    # a router retrained with other weights but the same settings: eval.json is not reused either
    key = eval_key(sr, sr.preset.eval)
    with torch.no_grad():
        for p in sr.router.parameters():
            p.add_(0.01)
    save_router(sr.paths.run, sr.router, sr.model)
    assert eval_key(load_run(run), sr.preset.eval) != key


def test_generate_and_chat_load_stacks_from_disk_as_answers_need_them(demo_dir, capsys, monkeypatch):
    assert main(["generate", "--run", str(demo_dir), "--prompt", "hi", "--weights", "math=1", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "[stacks from disk: 0 hits, 1 misses" in out  # math alone was read
    assert main(["generate", "--run", str(demo_dir), "--prompt", "hi", "--all-stacks", "--stack-budget-mb", "1"]) == 2
    assert "--all-stacks" in capsys.readouterr().err
    lines = iter(["/force code=1", "def add(a, b):", "/force chat=1", "hello", "/force code=1", "again", "/stats", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    # a budget below one domain's stacks: every answer is refused with the reason, and the session goes on
    assert main(["chat", "--run", str(demo_dir), "--max-new-tokens", "4", "--stack-budget-mb", "0.0001"]) == 0
    assert "over the 0.0 MB budget" in capsys.readouterr().out
    lines = iter(["/force code=1", "def add(a, b):", "/force chat=1", "hello", "/force code=1", "again", "/stats", "/quit"])
    assert main(["chat", "--run", str(demo_dir), "--max-new-tokens", "4"]) == 0
    assert "1 hits, 2 misses" in capsys.readouterr().out  # code, chat loaded; code again from memory


def test_bench_engine_on_a_trained_run(demo_dir, capsys):
    assert main(["bench", "engine", "--run", str(demo_dir), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["hits"] + r["misses"] >= r["n_prompts"] and r["misses"] >= 1 and r["router_ms"] > 0
    assert r["base_tokens_per_s"] > 0 and r["routed_tokens_per_s"] > 0
    assert main(["bench", "route", "--run", str(demo_dir)]) == 2


def test_the_demo_runs_the_harness_and_its_choice_is_evals_choice(demo_dir):
    """acc_mean through lm-evaluation-harness (our wrapper, the harness's requests and bookkeeping) against
    eval's own choice accuracy (evaluation/choice.py) on the same choice sets: the same share in every mode."""
    e = json.loads((demo_dir / "nullspace" / "eval.json").read_text())
    h = json.loads((demo_dir / "nullspace" / "harness.json").read_text())
    compared = 0
    for mode in h["modes"]:
        for d in e["domains"]:
            ours = e["results"][f"{mode}/{d}"].get("choice")
            theirs = h["results"].get(f"ministacks_choice_{d}", {}).get(mode, {}).get("acc_mean")
            assert (ours is None) == (theirs is None), (mode, d)
            if ours is not None:
                assert theirs["n"] == ours["n"] and theirs["value"] == pytest.approx(ours["correct"] / ours["n"])
                compared += 1
    assert compared >= 6
    report = (demo_dir / "report.md").read_text()
    assert "## Benchmarks through lm-evaluation-harness" in report and "](nullspace/harness.png)" in report
    assert (demo_dir / "nullspace" / "harness.png").stat().st_size > 10_000
    assert main(["eval", "--run", str(demo_dir), "--no-progress", "--table4"]) == 2


def test_eval_harness_reuses_the_demos_result(demo_dir, capsys):
    path = demo_dir / "nullspace" / "harness.json"
    before = path.stat().st_mtime_ns
    assert main(["eval", "--run", str(demo_dir), "--no-progress", "--harness"]) == 0
    out = capsys.readouterr().out
    assert "| ministacks_choice_math | acc_mean |" in out and f"wrote {path}" in out
    assert path.stat().st_mtime_ns == before  # the same settings: not run again
