"""Task scoring and the sandbox: a reference answer scores correct, a perturbed one does not, and
model-written code that loops, allocates, writes or reads the environment is stopped in the child."""

import dataclasses
import os
import resource
import tempfile
import time
from pathlib import Path

import pytest

from ministacks.data import DataConfig, Example, load_split
from ministacks.sandbox import MAX_FILE_BYTES, MAX_OUTPUT_CHARS, run_python
from ministacks.tasks import (
    CHECKS,
    DEFINITION_F1_THRESHOLD,
    content_words,
    extract_number,
    requested_signature,
    score,
    score_code,
    score_math,
    score_medical,
    score_reasoning,
)

SMOKE = DataConfig(max_examples=150, n_val=20, n_test=20)  # the smoke preset's data


@pytest.fixture(scope="module")
def test_split():
    cache = {}

    def get(domain):
        if domain not in cache:
            cache[domain] = load_split(domain, "test", SMOKE)
        return cache[domain]

    return get


# --- number extraction ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, number", [
    ("so 2 * 2 = 4\n#### 85", "85"),
    ("#### 3\nwait, no:\n#### 7", "7"),                # the last "####" wins
    ("#### 85\n\nNext question: 12 apples", "85"),     # text after the answer line is ignored
    ("He had 3 apples, then 12.", "12"),               # no "####": the last number
    ("#### 2,310", "2310"),
    ("So he makes $2,310.00 every week", "2310"),
    ("2,310.0", "2310"),
    ("#### 0.50", "0.5"),
    ("x = -4", "-4"),
    ("10-3", "3"),                                     # a minus between terms is not a sign
    ("the total is 1,234,567 dollars", "1234567"),
    ("no digits here", None),
    ("12 eggs, 3 each\n#### ", None),                  # the answer line started, never written
])
def test_extract_number(text, number):
    assert extract_number(text) == number


# --- math and reasoning on real examples ----------------------------------------------------------

def test_math_reference_scores_correct_and_a_changed_answer_does_not(test_split):
    examples = test_split("math")
    for ex in examples:
        assert score_math(ex.response, ex.answer), ex.response
        head, _ = ex.response.rsplit("####", 1)
        assert score_math(f"{head}#### ${int(ex.answer):,}.00", ex.answer)  # same value, other spelling
        assert not score_math(f"{head}#### {int(ex.answer) + 1}", ex.answer)
    result = score("math", examples[0], examples[0].response)
    assert result == {"correct": True, "predicted": examples[0].answer}


def test_reasoning_reference_scores_correct_and_a_wrong_answer_does_not(test_split):
    examples = test_split("reasoning")
    answers = {ex.answer.lower() for ex in examples}
    assert len(answers) > 1
    for ex in examples:
        trace, answer = ex.response.rsplit("</think>", 1)
        assert score_reasoning(ex.response, ex.answer)
        # case, spacing and a final period do not matter
        assert score_reasoning(f"{trace}</think>\n  {answer.strip().upper().rstrip('.')}.  ", ex.answer)
        wrong = next(a for a in sorted(answers) if a != ex.answer.lower())
        assert not score_reasoning(f"{trace}</think>\n{wrong}", ex.answer)
        assert not score_reasoning(f"{trace}</think>\n", ex.answer)    # the trace, then nothing
        assert not score_reasoning(trace + "\n" + ex.answer, ex.answer)  # trace never closed
    assert score("reasoning", examples[0], examples[0].response)["correct"] is True


# --- medical --------------------------------------------------------------------------------------

def test_medical_reference_scores_correct_for_both_kinds(test_split):
    examples = test_split("medical")
    results = [score_medical(ex.response, ex) for ex in examples]
    assert {r["kind"] for r in results} == {"code", "definition"}
    for ex, r in zip(examples, results):
        assert r["correct"], (ex, r)
        assert (r["f1"] is None) == (r["kind"] == "code")


def test_medical_code_must_match_exactly(test_split):
    codes = [ex for ex in test_split("medical") if ex.answer is not None]
    assert len({ex.answer for ex in codes}) > 1
    for ex, other in zip(codes, codes[1:] + codes[:1]):
        assert score_medical(f"The code is {ex.answer.lower()}.", ex)["correct"]  # first code-like token, any case
        assert not score_medical(other.answer, ex)["correct"]
        assert not score_medical(f"{other.answer} (not {ex.answer})", ex)["correct"]  # only the first counts
        assert not score_medical("I do not know.", ex)["correct"]


def test_medical_definitions_need_content_words_of_the_reference(test_split):
    texts = [ex for ex in test_split("medical") if ex.answer is None]
    for ex, other in zip(texts, texts[1:] + texts[:1]):
        unrelated = score_medical(other.response, ex)
        assert not unrelated["correct"] and unrelated["f1"] < DEFINITION_F1_THRESHOLD, (ex.response, other.response)
    # restating the question is not an answer: "Clinical features of <disease> include:" scores 0
    # (counting the question's words, it scores F1 > 0.5 on a third of the feature lists)
    listed = [ex for ex in texts if ex.response.startswith("Clinical features of")
              and content_words(ex.response, frozenset(content_words(ex.instruction)))]
    assert listed
    for ex in listed:
        header = ex.response.split("\n", 1)[0]
        assert score_medical(header, ex) == {"correct": False, "f1": 0.0, "kind": "definition"}


# --- code -----------------------------------------------------------------------------------------

def plain_function(examples):
    """The first example whose reference is one undecorated top-level def: its definition cannot need
    a module global, so the reference must pass."""
    import ast

    for ex in examples:
        tree = ast.parse(ex.response)
        node = tree.body[0]
        if (len(tree.body) == 1 and isinstance(node, ast.FunctionDef) and not node.decorator_list
                and all(isinstance(d, ast.Constant) for d in node.args.defaults + node.args.kw_defaults if d)
                and node.args.args and not any(a.annotation for a in node.args.args) and not node.returns):
            return ex
    raise AssertionError("no plain function among the code examples")


@pytest.fixture(scope="module")
def code_example(test_split):
    return plain_function(test_split("code"))


def test_code_reference_scores_correct(code_example):
    assert score_code(code_example.response, code_example) == {"correct": True, "reason": "ok"}
    assert score("code", code_example, code_example.response)["correct"] is True


def test_code_failures_are_named(code_example):
    ex = code_example
    name, _ = requested_signature(ex.instruction)
    cut = ex.response[: ex.response.index(":\n") + 2]  # generation stopped right after the def line
    assert score_code(cut, ex)["reason"].startswith("syntax error")
    renamed = ex.response.replace(f"def {name}(", f"def {name}_v2(", 1)
    assert score_code(renamed, ex) == {"correct": False, "reason": f"`{name}` is not defined"}
    extra = ex.response.replace(f"def {name}(", f"def {name}(extra_arg, ", 1)
    result = score_code(extra, ex)
    assert not result["correct"] and result["reason"].startswith("parameters")
    assert score_code(f"{name} = 42\n", ex)["reason"] == f"`{name}` is not callable"
    # exiting cleanly before the appended check runs is not a pass
    assert score_code("import sys\n" + ex.response + "\nsys.exit(0)\n", ex)["reason"] == "exited before the check ran"
    # an instruction without a signature cannot be checked
    blank = dataclasses.replace(ex, instruction="Write something useful.")
    assert score_code(ex.response, blank) == {"correct": False, "reason": "instruction names no `name(args)` signature"}


def test_code_tolerates_missing_globals_at_call_time_only(code_example):
    ex = code_example
    name, params = requested_signature(ex.instruction)
    body_needs_global = f"def {name}({', '.join(params)}):\n    return undefined_helper({params[0]})\n"
    assert score_code(body_needs_global, ex)["correct"]  # never called, so never fails
    decorated = "@undefined_decorator\n" + body_needs_global
    assert score_code(decorated, ex) == {
        "correct": False, "reason": "raised: NameError: name 'undefined_decorator' is not defined",
    }


@pytest.mark.parametrize("instruction, name, params", [
    ("Write a Python function `isabs(s)` that does the following.", "isabs", ["s"]),
    ("Write a Python function `python_branch()` that does the following.", "python_branch", []),
    ("Write the method `EnumType.__setattr__(cls, name, value)` that does the following.", "__setattr__", ["cls", "name", "value"]),
    ("Write an async Python function `f(a, /, b=(1, 2), *args, c, d=')', **kw)` that does the following.",
     "f", ["a", "b", "args", "c", "d", "kw"]),
    ("Write a Python function `g(x, *, key=None)` that does the following.", "g", ["x", "key"]),
])
def test_requested_signature(instruction, name, params):
    assert requested_signature(instruction) == (name, params)


def test_code_decorated_method_is_unwrapped():
    ex = Example("code", "Write the method `Box.size(self)` that does the following.", "The size.", "", None, "test")
    assert score_code("@property\ndef size(self):\n    return self._size\n", ex)["correct"]
    assert score_code("@classmethod\ndef size(cls, other):\n    return 0\n", ex)["reason"].startswith("parameters")


def test_code_infinite_loop_times_out(code_example):
    start = time.monotonic()
    result = score_code("while True:\n    pass\n" + code_example.response, code_example, timeout=0.5)
    assert result == {"correct": False, "reason": "timed out after 0.5 s"}
    assert time.monotonic() - start < 2.5


def test_code_huge_allocation_fails_in_the_child_only(code_example):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result = score_code("blob = bytearray(1 << 30)\n" + code_example.response, code_example)  # 1 GiB > 512 MB cap
    assert result == {"correct": False, "reason": "raised: MemoryError"}
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024


def test_code_cannot_write_past_the_file_size_limit(code_example):
    big = f"open('out.bin', 'wb').write(b'x' * {2 * MAX_FILE_BYTES})\n"
    result = score_code(big + code_example.response, code_example)
    assert result == {"correct": False, "reason": "raised: OSError: [Errno 27] File too large"}
    small = f"open('out.bin', 'wb').write(b'x' * {MAX_FILE_BYTES // 2})\n"
    assert score_code(small + code_example.response, code_example)["correct"]


def test_score_dispatch(code_example):
    assert score("chat", code_example, "Hello!") == {"correct": None}
    assert set(CHECKS) == {"chat", "code", "math", "medical", "reasoning"}
    with pytest.raises(ValueError, match="unknown domain"):
        score("poetry", code_example, "")


# --- sandbox --------------------------------------------------------------------------------------

def test_sandbox_captures_output_and_exit_status():
    result = run_python("import sys\nprint('to out')\nprint('to err', file=sys.stderr)\nsys.exit(3)")
    assert (result.stdout, result.stderr, result.returncode, result.ok, result.timed_out) == ("to out\n", "to err\n", 3, False, False)
    assert run_python("print(1 + 1)").ok


def test_sandbox_output_is_capped_keeping_head_and_tail():
    result = run_python("print('first'); print('x' * 100_000); print('last')")
    assert result.ok
    assert len(result.stdout) < MAX_OUTPUT_CHARS + 100
    assert result.stdout.startswith("first\n") and result.stdout.endswith("last\n")


def test_sandbox_runs_in_a_fresh_temp_dir_that_is_removed():
    result = run_python("import os\nprint(os.getcwd())\nprint(sorted(os.listdir()))")
    workdir, listing = result.stdout.splitlines()
    assert Path(workdir).parent == Path(tempfile.gettempdir()).resolve()
    assert workdir != os.getcwd() and listing == "['main.py']"
    assert not Path(workdir).exists()


def test_sandbox_does_not_inherit_the_environment(monkeypatch):
    monkeypatch.setenv("MINISTACKS_TEST_SECRET", "hunter2")
    monkeypatch.setenv("PYTHONPATH", "/nowhere")
    result = run_python("import os, sys\nprint(os.environ.get('MINISTACKS_TEST_SECRET'))\nprint('/nowhere' in sys.path)")
    assert result.stdout == "None\nFalse\n"
    # PYTHONHASHSEED=0 is honoured (it would not be under -I): str hashes agree between runs
    assert run_python("print(hash('abc'))").stdout == run_python("print(hash('abc'))").stdout


def test_sandbox_memory_limit():
    assert run_python("b = bytearray(64 << 20)", memory_mb=256).ok
    result = run_python("b = bytearray(1 << 30)", memory_mb=256)  # would succeed (lazily) without RLIMIT_AS
    assert not result.ok and result.stderr.rstrip().endswith("MemoryError")


def test_sandbox_leaves_no_process_behind():
    """A normal user's child cannot start processes at all (RLIMIT_NPROC = 0); root ignores that limit,
    so there a process the child starts must die with the child's process group."""
    if os.geteuid() != 0:
        result = run_python("import os\nos.fork()")
        assert not result.ok and "BlockingIOError" in result.stderr
        return
    result = run_python("import subprocess\nprint(subprocess.Popen(['sleep', '30']).pid)")
    assert result.ok
    pid = int(result.stdout)
    deadline = time.monotonic() + 2.0
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)  # the signal is delivered asynchronously
    assert not alive(pid)


def alive(pid: int) -> bool:
    """Running or sleeping; a zombie (dead, waiting for its reaper) or a vanished pid is not alive."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in "ZX"
