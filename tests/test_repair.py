"""A damaged stack never takes a run down with a traceback: every command refuses with one message that
names the damaged file and the repair, and following that advice retrains the run to what it was."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ministacks.__main__ import main

from damage import flip_middle_byte

TRAIN = ["train", "--preset", "smoke", "--domains", "chat,code", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    assert main([*TRAIN, "--out", str(out)]) == 0
    return out


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _stacks(run):
    return [(s["domain"], s["round"]) for s in json.loads((run / "manifest.json").read_text())["stacks"]]


def test_a_damaged_stack_is_one_message_naming_it_and_the_repair(run, capsys):
    damaged = run / "stacks" / "code_r01.safetensors"
    flip_middle_byte(damaged)
    # generate reads a stack when its answer needs it (the engine): ungated needs every one
    for argv in (["generate", "--run", str(run), "--prompt", "hi", "--max-new-tokens", "2", "--mode", "ungated"],
                 ["generate", "--run", str(run), "--prompt", "hi", "--max-new-tokens", "2", "--all-stacks"],
                 ["eval", "--run", str(run), "--no-progress"],
                 ["route", "--run", str(run), "--no-progress"],
                 [*TRAIN, "--out", str(run)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert str(damaged) in err and "Traceback" not in err
        assert f"python -m ministacks repair --run {run} --from code:1" in err


def test_following_the_repair_advice_retrains_the_same_run(run, trained, capsys):
    forgetting = json.loads((trained / "manifest.json").read_text())["forgetting"]
    (run / "stacks" / "code_r01.safetensors").write_bytes(b"truncated")
    assert main(["generate", "--run", str(run), "--prompt", "hi"]) == 2
    advice = re.search(r"python -m ministacks (repair --run \S+ --from \S+)", capsys.readouterr().err).group(1)
    assert main(advice.split()) == 0
    assert _stacks(run) == [s for s in _stacks(trained) if s[0] == "chat"]  # code r1 and all after it: gone
    assert main([*TRAIN, "--out", str(run)]) == 0  # the same command that trained it
    assert _stacks(run) == _stacks(trained)
    # seeds and data order are a function of the run, so the retrained stacks are the very same ones
    for name in ("code_r01", "code_r02"):
        before, after = (load_file(str(folder / "stacks" / f"{name}.safetensors")) for folder in (trained, run))
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        meta = [json.loads((folder / "stacks" / f"{name}.json").read_text())["meta"] for folder in (trained, run)]
        for m in meta:
            m.pop("seconds_per_step")  # wall-clock time
        assert meta[0] == meta[1]
    assert json.loads((run / "manifest.json").read_text())["forgetting"] == forgetting
    assert main(["generate", "--run", str(run), "--prompt", "hi", "--mode", "ungated", "--max-new-tokens", "2"]) == 0


def test_an_entry_removed_by_hand_is_not_silently_accepted(run, capsys):
    """The old advice (delete the stack and its manifest entry, train again) exited 0 without retraining."""
    manifest = json.loads((run / "manifest.json").read_text())
    last = max(s["round"] for s in manifest["stacks"] if s["domain"] == "chat")
    manifest["stacks"] = [s for s in manifest["stacks"] if (s["domain"], s["round"]) != ("chat", last)]
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert main([*TRAIN, "--out", str(run)]) == 2
    assert f"repair --run {run} --from chat:{last}" in capsys.readouterr().err


def test_repair_checks_its_arguments(run, capsys):
    assert main(["repair", "--run", str(run), "--from", "code"]) == 2
    assert "DOMAIN:ROUND" in capsys.readouterr().err
    assert main(["repair", "--run", str(run), "--from", "law:1"]) == 2
    assert "no domain 'law'" in capsys.readouterr().err
    assert main(["repair", "--run", str(run), "--from", "code:9"]) == 2  # no such round: nothing is undone
    assert "takes N from 1 to 3" in capsys.readouterr().err
    assert main(["repair", "--run", str(run), "--from", "code:0"]) == 2

