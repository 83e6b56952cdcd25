"""The paper's experiments as scripts (scale/experiments.py) on a pretrained base, end to end on tiny random bases
built from in-code configs: every script runs, resumes, and writes the findings beside the paper's; and what
makes a pretrained base a ministacks base (scale/model.py: the model interface, the run folder's record)."""

import json

import pytest
import torch

from ministacks.__main__ import main as ministacks_main
from ministacks.data import DataConfig
from ministacks.data import hub
from ministacks.data.splits import recipe
from ministacks.lm.cache import left_padded
from ministacks.presets import SMOKE
from ministacks.stacks.layer import StackedLinear
from scale.experiments import EXPERIMENTS, main
from scale.model import PretrainedLM, open_pretrained, write_pretrained
from scale.tiny import tiny_base


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("tiny") / "llama", data=SMOKE.data)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """The CPU script (Exp 1 + a three-domain Exp 2 with and without null-space, router, evaluation), tiny."""
    out = tmp_path_factory.mktemp("cpu")
    assert main("cpu", ["--tiny", "--out", str(out), "--no-progress"]) == 0
    return out


def test_the_cpu_script_runs_every_stage_and_reports_each_finding_beside_the_papers(cpu_run):
    summary = json.loads((cpu_run / "experiment.json").read_text())
    assert summary["stages"] == ["compare", "continual", "route", "eval", "harness"] and summary["base_params"] > 0
    for name in ("compare.json", "forgetting.json", "nullspace/router.json", "nullspace/eval.json",
                 "nullspace/harness.json", "report.md"):
        assert (cpu_run / name).is_file(), name
    forgetting = json.loads((cpu_run / "forgetting.json").read_text())
    assert forgetting["domains"] == ["chat", "math", "medical"] and set(forgetting["runs"]) == {
        "without null-space", "with null-space"}
    report = (cpu_run / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| 1. ") or line.startswith("| 4. ")
            or line.startswith("| 5. ") or line.startswith("| 7. ")]
    assert len(rows) == 4 and not any("not measured" in r for r in rows)  # Exp 1, null-space, oracle, general text
    assert "| 3. " in report and "embedded corpora" in report  # boosting is not in this script; the data is named
    assert "## Benchmarks through lm-evaluation-harness" in report and "| ministacks_choice_math | acc_mean |" in report
    # the stacks sit on the 4-bit projections of the Hugging Face model the folder names
    record = json.loads((cpu_run / "base" / "pretrained.json").read_text())
    assert record["source"] == str((cpu_run / "tiny_base").resolve())


def test_a_finished_script_again_trains_nothing(cpu_run):
    stacks = sorted((cpu_run / "nullspace" / "stacks").iterdir())
    stamps = [p.stat().st_mtime_ns for p in stacks]
    before = json.loads((cpu_run / "stage_times.json").read_text())
    assert main("cpu", ["--tiny", "--out", str(cpu_run), "--no-progress"]) == 0
    assert [p.stat().st_mtime_ns for p in sorted((cpu_run / "nullspace" / "stacks").iterdir())] == stamps
    after = json.loads((cpu_run / "stage_times.json").read_text())
    assert after["continual"] - before["continual"] < 0.5 * before["continual"]


def test_ministacks_commands_work_on_a_pretrained_run(cpu_run, capsys):
    assert ministacks_main(["generate", "--run", str(cpu_run), "--prompt", "What is 2 + 3?", "--mode", "compare",
                            "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "[base: base (every stack off)]" in out and "[routed: " in out


@pytest.mark.parametrize("name", ["exp1", "exp2", "exp3", "rl"])
def test_every_paper_script_runs_end_to_end_on_a_tiny_base(name, tmp_path):
    exp = EXPERIMENTS[name]
    assert main(name, ["--tiny", "--out", str(tmp_path), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "experiment.json").read_text())
    assert summary["stages"] == list(exp.stages)
    expected = {"compare": "compare.json", "boost": "boost.json", "continual": "forgetting.json",
                "route": "router.json", "eval": "eval.json", "harness": "harness.json", "rl": "rl/rl.json"}
    for stage in exp.stages:
        assert (tmp_path / expected[stage]).is_file(), stage
    report = (tmp_path / "report.md").read_text()
    if name == "rl":  # SFT, then GRPO on math's stack before it is frozen: its curve and before / after
        rl = json.loads((tmp_path / "rl" / "rl.json").read_text())["domains"]["math"]
        assert rl["method"] == "grpo" and rl["steps_run"] == SMOKE.rl.steps and "## RL after SFT" in report
    else:
        assert "## Findings: the paper's, and ours" in report


def test_the_paper_configs_hold_the_papers_values():
    e1, e2, e3 = (EXPERIMENTS[n].preset for n in ("exp1", "exp2", "exp3"))
    assert (e1.stack.steps, e1.stack.lr, e1.stack.batch_size, e1.stack.seq_len) == (400, 2e-4, 16, 512)
    assert (e1.adapter.n_experts, e1.adapter.r, e1.adapter.top_k, e1.adapter.lora_r) == (4, 16, 2, 64)
    assert e2.continual.domains == ("chat", "code", "medical", "math") and e2.continual.rounds == 3
    assert (e2.continual.ns_examples, e2.continual.ns_k) == (200, 32)
    assert len(e3.continual.domains) == 5 and e3.continual.rounds == 2
    assert (e3.continual.ns_examples, e3.continual.ns_k, e3.stack.lr) == (400, 64, 1e-4)
    assert EXPERIMENTS["exp3"].base == "google/gemma-3-12b-it" and all(p.quant == "nf4" for p in (e1, e2, e3))
    # Exp 3's harness stage runs the paper's Table 4 (eight benchmarks from the hub); no other script asks the hub
    assert "harness" in EXPERIMENTS["exp3"].stages and e3.eval.harness.table4
    assert not any(EXPERIMENTS[n].preset.eval.harness.table4 for n in EXPERIMENTS if n != "exp3")


# -- the pretrained base behind ministacks' model interface ------------------------------------------


def test_the_pretrained_model_answers_as_ministacks_asks(tiny_folder, tmp_path):
    write_pretrained(tmp_path, tiny_folder, 128)
    model, tok = open_pretrained(tmp_path, quant="none", device="cpu")
    assert isinstance(model, PretrainedLM) and sum(isinstance(m, StackedLinear) for m in model.modules()) == 14
    ids = torch.tensor([tok.encode("The cat sat on the mat.", bos=True)])
    with torch.no_grad():
        full = model.hf(input_ids=ids).logits
        assert torch.equal(model(ids).logits, full)
        at = torch.zeros_like(ids, dtype=torch.bool)
        at[0, [1, 3]] = True
        assert torch.allclose(model(ids, at=at).logits, full[at], atol=1e-6)  # the LM head at two positions only
        hidden = model(ids, output_hidden_states=True, return_logits=False)
        assert hidden.logits is None and len(hidden.hidden_states) == 3  # embeddings + 2 layers
        # the Hugging Face loss under ministacks' label alignment: position t predicts labels[t + 1]
        loss = torch.nn.functional.cross_entropy(full[0, :-1], ids[0, 1:])
        assert torch.allclose(model(ids, labels=ids).loss, loss, atol=1e-5)
    greedy = model.generate(ids, 6)
    reference = model.hf.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(greedy, reference[:, : greedy.shape[1]])
    assert torch.equal(model.generate(ids, 6, use_cache=False), greedy)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(ids, 128)
    # prompts of other lengths in one left-padded batch: each row continues as it does alone
    prompts = [tok.encode(text, bos=True) for text in ("The cat sat on the mat.", "A dog.", "Two birds sang")]
    batch, pad = left_padded(prompts, tok.pad_id)
    together = model.generate(batch, 6, pad=pad)
    for row, prompt in zip(together, prompts):
        assert torch.equal(row[batch.shape[1]:], model.generate(torch.tensor([prompt]), 6)[0, len(prompt):])


def test_a_folder_keeps_its_pretrained_base(tiny_folder, tmp_path):
    write_pretrained(tmp_path, tiny_folder, 128)
    write_pretrained(tmp_path, tiny_folder, 128)  # the same record again: nothing to do
    with pytest.raises(ValueError, match="already holds"):
        write_pretrained(tmp_path, tiny_folder, 64)
    record = json.loads((tmp_path / "base" / "pretrained.json").read_text())
    record["tokenizer"] = "0" * 16
    (tmp_path / "base" / "pretrained.json").write_text(json.dumps(record))
    with pytest.raises(Exception, match="tokenizer"):
        open_pretrained(tmp_path, quant="none", device="cpu")


# -- the paper's data sets -------------------------------------------------------------------------------


def test_rows_become_examples_as_the_paper_mapped_them(monkeypatch):
    rows = {"openai/gsm8k": [{"question": "Tom has 3 apples and buys 4,000 more. How many?",
                              "answer": "3 + 4000 = 4003\n#### 4,003"}]}
    monkeypatch.setattr(hub, "_rows", lambda s: rows[s.id])
    (ex,) = hub.build("math", "tinyllama", DataConfig())
    assert (ex.instruction, ex.input, ex.answer, ex.source) == (rows["openai/gsm8k"][0]["question"], "", "4003",
                                                                "hub:openai/gsm8k")
    # chat sets: the first turn only — the first user message and the first reply after it
    turns = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"},
                          {"role": "assistant", "content": "no"}]}
    assert hub.first_turn(turns) == ("hi", "", "hello")
    assert hub.first_turn({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}) == (
        "q", "", "a")
    assert hub.first_turn({"messages": [{"role": "user", "content": "unanswered"}]}) is None
    assert hub.math_answer("so the answer is \\boxed{12}.") == "12" and hub.math_answer("no number") is None


def test_without_the_hub_the_scripts_say_so_and_fall_back(capsys):
    from scale.data import paper_data

    assert hub.hub_unavailable("tinyllama", ["chat"]) is not None  # HF_HUB_OFFLINE=1 (conftest), nothing cached
    cfg, note = paper_data("tinyllama", ["chat", "math"], DataConfig())
    assert cfg == DataConfig() and "tatsu-lab/alpaca" in note and "openai/gsm8k" in note
    assert "embedded corpora" in capsys.readouterr().out
    with pytest.raises(ValueError, match="hub"):
        DataConfig(hub="alpaca")
    # the embedded corpora keep the cache key they had before the field existed
    assert "hub" not in recipe(DataConfig())["config"] and recipe(DataConfig(hub="gemma"))["config"]["hub"] == "gemma"


def test_the_harness_runs_on_a_pretrained_run_and_its_choice_is_evals_choice(cpu_run, capsys):
    """lm-evaluation-harness through the scale path: `eval --harness` on the Hugging Face base's run, in base /
    ungated / routed mode; acc_mean (our wrapper's batched scoring, each row under its own route) equals eval's
    own choice accuracy (every candidate as a whole example) on the same choice sets, as on the toy model."""
    assert ministacks_main(["eval", "--run", str(cpu_run), "--no-progress", "--harness"]) == 0
    assert "| ministacks_choice_medical | acc_mean |" in capsys.readouterr().out
    e = json.loads((cpu_run / "nullspace" / "eval.json").read_text())
    h = json.loads((cpu_run / "nullspace" / "harness.json").read_text())
    assert h["modes"] == ["base", "ungated", "routed"]
    compared = 0
    for mode in h["modes"]:
        for d in e["domains"]:
            ours = e["results"][f"{mode}/{d}"]["choice"]
            theirs = h["results"][f"ministacks_choice_{d}"][mode]["acc_mean"]
            assert theirs["n"] == ours["n"] > 0 and theirs["value"] == pytest.approx(ours["correct"] / ours["n"])
            compared += 1
    assert compared == 9


def test_table4_without_the_hub_says_so_and_keeps_the_local_tasks(cpu_run):
    """The paper's Table 4 reads its eight benchmarks from the hub: offline, harness.json says why it did not run,
    in words that name the hub and what to do, and the local tasks are measured all the same."""
    from ministacks.stages.harness_eval import harness_stage

    h = harness_stage(cpu_run / "nullspace", table4=True)
    assert "table4" not in h and "hub" in h["table4_unavailable"] and "machine that reaches the hub" in h["table4_unavailable"]
    assert h["results"]["ministacks_choice_chat"]["base"]["acc_mean"]["n"] > 0


def test_rl_on_a_pretrained_run(cpu_run, capsys):
    """GRPO through the scale path: the run's last-trained domain (medical, the ICD codes' reward) on the Hugging
    Face base, with the same rl command (last in this file: it changes the run's last stack)."""
    assert ministacks_main(["rl", "--run", str(cpu_run), "--domain", "medical", "--method", "grpo", "--no-progress"]) == 0
    assert "medical grpo" in capsys.readouterr().out
    summary = json.loads((cpu_run / "nullspace" / "rl.json").read_text())
    r = summary["domains"]["medical"]
    assert r["before"]["measure"] == "accuracy" and r["before"]["n"] > 0 and r["curve"]
