"""Task scoring: a reference answer scores correct, a perturbed one does not; the code format check is
named as one and never counted as accuracy (the sandbox itself is tested in test_sandbox.py)."""

import dataclasses
import resource
import time

import pytest

from ministacks.data import DataConfig, Example, load_split
from ministacks.evaluation.sandbox import MAX_FILE_BYTES
from ministacks.evaluation.tasks import (
    CHECKS,
    DEFINITION_F1_THRESHOLD,
    check_code_format,
    content_words,
    extract_number,
    requested_signature,
    score,
    score_math,
    score_medical,
    score_reasoning,
    wilson_interval,
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


def test_code_reference_passes_the_format_check(code_example):
    assert check_code_format(code_example.response, code_example) == {"format_ok": True, "reason": "ok"}
    # a format check is not a verdict on correctness: score() reports it under its own name
    assert score("code", code_example, code_example.response) == {"correct": None, "format_ok": True, "reason": "ok"}


def test_a_wrong_function_of_the_right_shape_is_not_counted_correct():
    """`return 42` has the requested name and parameters: it passes the format check, which says
    exactly that and no more; nothing counts it as a correct answer."""
    ex = Example("code", "Write a Python function `isabs(s)` that does the following.",
                 "Test whether a path is absolute", "def isabs(s):\n    return s.startswith('/')", None, "test")
    result = score("code", ex, "def isabs(s):\n    return 42\n")
    assert result["correct"] is None and result["format_ok"] is True
    assert "format check" in CHECKS["code"] and "HumanEval" in CHECKS["code"]


def test_code_failures_are_named(code_example):
    ex = code_example
    name, _ = requested_signature(ex.instruction)
    cut = ex.response[: ex.response.index(":\n") + 2]  # generation stopped right after the def line
    assert check_code_format(cut, ex)["reason"].startswith("syntax error")
    renamed = ex.response.replace(f"def {name}(", f"def {name}_v2(", 1)
    assert check_code_format(renamed, ex) == {"format_ok": False, "reason": f"`{name}` is not defined"}
    extra = ex.response.replace(f"def {name}(", f"def {name}(extra_arg, ", 1)
    result = check_code_format(extra, ex)
    assert not result["format_ok"] and result["reason"].startswith("parameters")
    assert check_code_format(f"{name} = 42\n", ex)["reason"] == f"`{name}` is not callable"
    # exiting cleanly before the appended check runs is not a pass
    assert check_code_format("import sys\n" + ex.response + "\nsys.exit(0)\n", ex)["reason"] == "exited before the check ran"
    # an instruction without a signature cannot be checked
    blank = dataclasses.replace(ex, instruction="Write something useful.")
    assert check_code_format(ex.response, blank) == {"format_ok": False, "reason": "instruction names no `name(args)` signature"}


def test_code_tolerates_missing_globals_at_call_time_only(code_example):
    ex = code_example
    name, params = requested_signature(ex.instruction)
    body_needs_global = f"def {name}({', '.join(params)}):\n    return undefined_helper({params[0]})\n"
    assert check_code_format(body_needs_global, ex)["format_ok"]  # never called, so never fails
    decorated = "@undefined_decorator\n" + body_needs_global
    assert check_code_format(decorated, ex) == {
        "format_ok": False, "reason": "raised: NameError: name 'undefined_decorator' is not defined",
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
    assert check_code_format("@property\ndef size(self):\n    return self._size\n", ex)["format_ok"]
    assert check_code_format("@classmethod\ndef size(cls, other):\n    return 0\n", ex)["reason"].startswith("parameters")


def test_code_infinite_loop_times_out(code_example):
    start = time.monotonic()
    result = check_code_format("while True:\n    pass\n" + code_example.response, code_example, timeout=0.5)
    assert result == {"format_ok": False, "reason": "timed out after 0.5 s"}
    assert time.monotonic() - start < 2.5


def test_code_huge_allocation_fails_in_the_child_only(code_example):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result = check_code_format("blob = bytearray(1 << 30)\n" + code_example.response, code_example)  # 1 GiB > 512 MB cap
    assert result == {"format_ok": False, "reason": "raised: MemoryError"}
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024


def test_code_cannot_write_past_the_file_size_limit(code_example):
    big = f"open('out.bin', 'wb').write(b'x' * {2 * MAX_FILE_BYTES})\n"
    result = check_code_format(big + code_example.response, code_example)
    assert result == {"format_ok": False, "reason": "raised: OSError: [Errno 27] File too large"}
    small = f"open('out.bin', 'wb').write(b'x' * {MAX_FILE_BYTES // 2})\n"
    assert check_code_format(small + code_example.response, code_example)["format_ok"]


def test_score_dispatch(code_example):
    assert score("chat", code_example, "Hello!") == {"correct": None}
    assert set(CHECKS) == {"chat", "code", "math", "medical", "reasoning"}
    with pytest.raises(ValueError, match="unknown domain"):
        score("poetry", code_example, "")


# --- Wilson interval -----------------------------------------------------------------------------

def wilson_by_inversion(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The slow, obvious reference: the interval is every p the score test does not reject,
    |k/n - p| <= z·sqrt(p(1-p)/n); find its two ends by bisection."""
    def accepted(p):
        return abs(k / n - p) <= z * (p * (1 - p) / n) ** 0.5

    def edge(inside, outside):
        for _ in range(200):
            mid = (inside + outside) / 2
            inside, outside = (mid, outside) if accepted(mid) else (inside, mid)
        return inside

    share = k / n
    return edge(share, 0.0) if k else 0.0, edge(share, 1.0) if k < n else 1.0


@pytest.mark.parametrize("k, n", [(0, 10), (1, 10), (3, 10), (5, 10), (10, 10), (0, 164), (7, 164), (150, 164)])
def test_wilson_interval_equals_the_inverted_score_test(k, n):
    assert wilson_interval(k, n) == pytest.approx(wilson_by_inversion(k, n), abs=1e-9)


def test_wilson_interval_contains_its_share_exactly_at_the_ends():
    """Every k/n up to n = 400 lies inside its interval, bounds included: at 0/n the low bound is 0.0 and at
    n/n the high bound 1.0 exactly (a bar's error below the share is never negative)."""
    for n in range(1, 401):
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0
        for k in range(n + 1):
            low, high = wilson_interval(k, n)
            assert low <= k / n <= high and k / n - low >= 0 and high - k / n >= 0, (k, n)


def test_wilson_interval_known_values_and_errors():
    assert wilson_interval(3, 10) == pytest.approx((0.1078, 0.6032), abs=1e-4)  # a textbook value
    low, high = wilson_interval(0, 164)
    assert low == 0.0 and 0.02 < high < 0.025  # 0 of 164 still allows ~2.3%
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)
