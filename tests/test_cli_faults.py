"""Faults and bad input at the command line: Ctrl-C, out-of-range arguments, folders that cannot be written.
Each is one clear line (exit 130 for Ctrl-C, 2 for a user's mistake), never a traceback. The commands'
work is replaced by stand-ins, so these run in seconds; one test sends a real SIGINT to a real run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ministacks import io
from ministacks.__main__ import build_parser, main
from ministacks.inference.stacked import StackedRun, describe_weights, parse_weights
from ministacks.presets import QUICK, literal


# Every command's module imported now, before any test patches a stage: a module imported for the first time
# while a stage is patched (demo.py's `from .pretrain import stage_pretrain`) would keep the stand-in for good,
# and every later test in this process (the demo's, say) would run it
build_parser()


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


class FakeRun:
    """Stands in for StackedRun in chat/generate: two domains, a router, answers "ok"."""

    made = 0

    cache = None  # every stack "in memory": nothing for generate to report about loads

    def __init__(self, path, preset=None, router=True, **engine):
        FakeRun.made += 1
        self.paths = type("P", (), {"run": Path(path)})()
        self.domains = ("chat", "math")
        self.router = object() if router else None
        self.asked = []

    def generate(self, text, mode, max_new_tokens=96):
        if isinstance(mode, dict):  # the real set_mode's check
            unknown = set(mode) - set(self.domains)
            if unknown:
                raise ValueError(f"no stacks for {', '.join(sorted(unknown))} in this run")
        self.asked.append((text, mode))
        return {"completion": "ok", "weights": mode if isinstance(mode, dict) else None}

    def route(self, text):
        return {"probs": {"chat": 0.5, "math": 0.5}, "weights": {"chat": 0.5, "math": 0.5}}


@pytest.fixture
def fake_run(monkeypatch):
    FakeRun.made = 0
    monkeypatch.setattr("ministacks.stages.common.load_run", FakeRun)  # generate's and chat's loader
    return FakeRun


# -- (4) Ctrl-C is a clean stop --------------------------------------------------------------------

@pytest.mark.parametrize("argv, target", [
    (["train", "--preset", "smoke"], "ministacks.stages.continual.train_stage"),
    (["pretrain", "--preset", "smoke"], "ministacks.stages.pretrain.stage_pretrain"),
    (["compare", "--preset", "smoke"], "ministacks.stages.compare.run_compare"),
    (["route"], "ministacks.stages.route.route_stage"),
    (["eval"], "ministacks.stages.evaluate.eval_stage"),
])
def test_ctrl_c_is_one_line_and_exit_130(argv, target, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(target, _interrupt)
    flag = "--run" if argv[0] in ("route", "eval") else "--out"
    assert main([*argv, flag, str(tmp_path), "--no-progress"]) == 130
    captured = capsys.readouterr()
    assert _one_line(captured.err) == "stopped; run the same command to resume"


@pytest.mark.parametrize("fault, rc, line", [(KeyboardInterrupt, 130, "bye"), (EOFError, 0, None)])
def test_chat_ends_cleanly_on_ctrl_c_and_ctrl_d(fault, rc, line, fake_run, monkeypatch, capsys):
    def ask(prompt=""):
        raise fault

    monkeypatch.setattr("builtins.input", ask)
    assert main(["chat", "--run", "x"]) == rc
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if line is None:
        assert captured.err == ""
    else:
        assert _one_line(captured.err) == line


def test_ctrl_c_during_an_atomic_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    io.atomic_write_json(target, {"step": 1})
    monkeypatch.setattr(io.os, "fsync", _interrupt)  # after the temporary file is written, before the rename
    with pytest.raises(KeyboardInterrupt):
        io.atomic_write_json(target, {"step": 2})
    with pytest.raises(KeyboardInterrupt):
        io.atomic_save_tensors(tmp_path / "t.safetensors", {"w": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no .state.json.*.tmp
    assert io.read_json(target) == {"step": 1}  # the good file is untouched


# `python -m ministacks` whose pretraining waits a minute after its first checkpoint: the run is certainly in
# its loop when the test's Ctrl-C comes (the smoke run's remaining steps take about a second, which a busy
# machine could spend before the test wakes), and a Ctrl-C that is not acted on fails by the timeout
_HELD_AFTER_A_CHECKPOINT = """
import sys, time
import ministacks.lm.pretrain as pretrain
save = pretrain.save_checkpoint
def held(*args, **kwargs):
    save(*args, **kwargs)
    time.sleep(60)
pretrain.save_checkpoint = held
from ministacks.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_real_sigint_stops_pretraining_with_one_line(tmp_path):
    """`pretrain` in a subprocess; SIGINT once it has written a checkpoint, in the loop."""
    out = tmp_path / "run"
    env = {**os.environ, "MINISTACKS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-c", _HELD_AFTER_A_CHECKPOINT, "pretrain", "--preset", "smoke", "--out",
                             str(out), "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[1],
                            # Ctrl-C's default action in the child: a shell without job control starts a
                            # background job (a CI runner's, say) with SIGINT ignored, which its children inherit
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 50
        while not (out / "checkpoints").is_dir() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        if proc.poll() is not None:
            pytest.fail(f"pretrain ended before a checkpoint (rc {proc.returncode}): {proc.stderr.read()}")
        assert (out / "checkpoints").is_dir(), "no checkpoint within 50 s"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert _one_line(err) == "stopped; run the same command to resume"
    assert not list(out.rglob("*.tmp"))


# -- (6) arguments are checked -----------------------------------------------------------------------

@pytest.mark.parametrize("text, says", [
    ("chat=-1", "finite numbers in (0.12, 10]"),
    ("chat=nan", "finite numbers in (0.12, 10]"),
    ("chat=inf", "finite numbers in (0.12, 10]"),
    ("chat=1e30", "finite numbers in (0.12, 10]"),
    ("chat=0.12", "switches the domain off: leave chat out"),
    ("math=0.05", "switches the domain off: leave math out"),
    ("chat=1,chat=2", "given twice"),
    ("", "no weights"),
])
def test_generate_refuses_bad_weights_before_loading_the_run(text, says, fake_run, capsys):
    assert main(["generate", "--run", "x", "--prompt", "hi", "--weights", text]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("error: ") and says in line
    assert fake_run.made == 0  # refused before the (slow) load


def test_good_weights_are_used_and_printed(fake_run, capsys):
    assert main(["generate", "--run", "x", "--prompt", "hi", "--weights", "chat=1,math=10"]) == 0
    assert "[forced: math 10.00, chat 1.00]" in capsys.readouterr().out


def test_weights_are_checked_against_the_runs_domains():
    with pytest.raises(ValueError, match="no stacks for law in this run; it has chat, math"):
        parse_weights("law=1", ("chat", "math"))
    # StackedRun.stacks_for too (generate's path), and nan/inf from code, not only from the command line
    run = StackedRun(torch.nn.Linear(2, 2), None, ("chat", "math"))
    with pytest.raises(ValueError, match="no stacks for law"):
        run.stacks_for({"law": 1.0})
    with pytest.raises(ValueError, match="finite numbers"):
        run.stacks_for({"chat": float("nan")})
    assert run.stacks_for({"chat": 0.5}).as_json() == {"chat": 0.5}


def test_describe_weights_never_shows_a_skipped_domain_as_used():
    assert describe_weights({"chat": 0.5, "math": 0.1}) == "chat 0.50"
    assert describe_weights({"math": 0.1}) == "base (every stack off)"


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("n", ["0", "-3", "many"])
def test_max_new_tokens_must_be_at_least_one(command, n, capsys):
    argv = [command, "--run", "x", "--max-new-tokens", n] + (["--prompt", "hi"] if command == "generate" else [])
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"argument --max-new-tokens: '{n}' is not a whole number of at least 1" in capsys.readouterr().err


def test_generate_method_refuses_zero_tokens():
    with pytest.raises(ValueError, match="at least 1"):
        StackedRun.generate(object(), "hi", "base", max_new_tokens=0)


def test_chat_force_with_a_bad_domain_keeps_the_previous_setting(fake_run, monkeypatch, capsys):
    lines = iter(["/force math=1", "/force maht=1", "/force chat=nan", "/force", "what is 2+2?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--run", "x"]) == 0
    out = capsys.readouterr().out
    assert "error: no stacks for maht in this run; it has chat, math" in out
    assert "error: chat=nan: weights must be finite numbers in (0.12, 10]" in out
    assert "error: no weights" in out
    assert "[forced: math 1.00]\nok" in out  # the last good /force still holds


# -- (7) write faults are messages --------------------------------------------------------------------

@pytest.mark.parametrize("command, target", [
    ("pretrain", "ministacks.stages.pretrain.stage_pretrain"),
    ("train", "ministacks.stages.continual.train_stage"),
    ("demo", "ministacks.stages.demo.stage_pretrain"),
    ("compare", "ministacks.stages.compare.run_compare"),
    ("boost", "ministacks.stages.boost.run_boost"),
])
@pytest.mark.parametrize("where, says", [
    ("file", "is a file, not a folder"),            # --out is itself a file
    ("file/sub", "which is a file, not a folder"),  # --out is under a file (its parent is one)
    ("file/sub/deeper", "which is a file, not a folder"),
])
def test_an_out_that_cannot_be_a_folder_is_refused_before_any_work(command, target, where, says, tmp_path,
                                                                    monkeypatch, capsys):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(target, lambda *a, **k: pytest.fail("work started"))
    out = tmp_path / where
    assert main([command, "--preset", "smoke", "--out", str(out), "--no-progress"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"error: --out {out} ") and says in line


def test_a_write_fault_during_work_names_the_file_not_the_temporary_one(tmp_path, monkeypatch, capsys):
    """A folder that goes bad after the check (here: replaced by a file) — the OSError is one line."""
    out = tmp_path / "run"

    def stage(preset, out_dir, progress=True):
        Path(out_dir).rmdir()
        Path(out_dir).write_text("now a file")
        io.atomic_write_json(Path(out_dir) / "pretrain.json", {})

    monkeypatch.setattr("ministacks.stages.pretrain.stage_pretrain", stage)
    assert main(["pretrain", "--preset", "smoke", "--out", str(out), "--no-progress"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"error: {out / 'pretrain.json'}: ") and ".tmp" not in line


def test_atomic_writes_name_the_target_on_failure(tmp_path):
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "file" / "a.json", tmp_path / "file" / "sub" / "a.json"):
        with pytest.raises(OSError) as e:
            io.atomic_write_json(path, {})
        assert e.value.filename == str(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_demo_literal_runs_the_literal_preset(tmp_path, monkeypatch):
    seen = []

    def stage(preset, out, progress=True):
        seen.append(preset)
        raise KeyboardInterrupt

    monkeypatch.setattr("ministacks.stages.demo.stage_pretrain", stage)
    for flags in ([], ["--literal"]):
        assert main(["demo", "--preset", "quick", "--out", str(tmp_path / "run"), "--no-progress", *flags]) == 130
    plain, lit = seen
    assert plain.name == "quick" and lit == literal(QUICK)
