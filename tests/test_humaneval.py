"""HumanEval as the code domain's benchmark: the reference solutions pass their own tests in our sandbox
and wrong ones fail; a problem is asked in the training data's format; a completion is cut where the
function ends; pass@1 and its interval are counted over every problem, asked or not."""

import ast
from types import SimpleNamespace

import pytest

from ministacks.evaluation import humaneval
from ministacks.data import code, raw_prompt
from ministacks.presets import EvalConfig
from ministacks.stacks.layer import StacksOn
from ministacks.stages.evaluate import _humaneval
from ministacks.evaluation.humaneval import (
    Problem,
    function_body,
    load_problems,
    model_prompt,
    pass_at_1,
    response_prefix,
    run_tests,
    to_example,
)
from ministacks.evaluation.tasks import wilson_interval


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_load_problems(problems):
    assert len(problems) == humaneval.N_PROBLEMS
    assert [p.task_id for p in problems] == [f"HumanEval/{i}" for i in range(humaneval.N_PROBLEMS)]
    assert load_problems(3) == problems[:3]
    with pytest.raises(ValueError, match="there are 164"):
        load_problems(165)


# --- the reference passes, wrong answers fail -----------------------------------------------------

def test_every_canonical_solution_passes_its_tests_in_the_sandbox(problems):
    """All 164 (~10 s on 2 cores: one interpreter start per problem). The stop rule keeps every
    reference body whole, so a model that wrote the reference would score 164/164."""
    failed = {}
    for p in problems:
        assert function_body(p.canonical_solution) == p.canonical_solution.rstrip(), p.task_id
        result = run_tests(p, function_body(p.canonical_solution))
        if not result["passed"]:
            failed[p.task_id] = result["reason"]
    assert not failed


def test_wrong_solutions_fail(problems):
    # a deterministic sample of 20 (every 8th problem) answered with a body that returns None
    for p in problems[::8][:20]:
        assert not run_tests(p, "    return None")["passed"], p.task_id
    truncate = problems[2]  # truncate_number(3.5) == 0.5
    assert run_tests(truncate, "    return number % 1.0")["passed"]
    assert not run_tests(truncate, "    return number")["passed"]  # right name and signature, wrong value
    assert not run_tests(truncate, "    return int(number)")["passed"]


def test_a_hang_a_crash_and_a_syntax_error_are_failures(problems):
    p = problems[2]
    assert run_tests(p, "    while True:\n        pass", timeout=0.5) == {"passed": False, "reason": "timed out after 0.5 s"}
    assert run_tests(p, "    return undefined_helper(number)")["reason"].startswith("NameError")
    assert run_tests(p, "    return (")["reason"].startswith("SyntaxError")
    assert run_tests(p, "")["reason"] == "AssertionError"  # only the docstring: returns None


# --- asking: the training data's format -----------------------------------------------------------

def test_a_problem_is_asked_exactly_as_data_code_writes_its_examples():
    """Parity with the code domain's own builder: same instruction, same input (the cleaned docstring),
    and the reference response is the prefix we give plus the body we expect."""
    prompt = ('import math\n\n\ndef area(r: float, scale=2) -> float:\n'
              '    """Area of a circle.\n\n    >>> area(1.0)\n    6.28...\n    """\n')
    body = "    return scale * math.pi * r * r\n"
    problem = Problem("HumanEval/test", prompt, "area", "def check(f):\n    assert f(1.0, 1) == math.pi\n", body)
    source = prompt + body
    node = ast.parse(source).body[-1]
    reference = code._example(node, None, source.splitlines(keepends=True), "test")
    ours = to_example(problem)
    assert (ours.instruction, ours.input) == (reference.instruction, reference.input)
    assert response_prefix(problem) == "import math\n\n\ndef area(r: float, scale=2) -> float:\n"
    assert ours.response == "import math\n\n\n" + reference.response  # the prompt's imports stay in
    assert model_prompt(problem) == ours.prompt() + response_prefix(problem)
    assert run_tests(problem, body)["passed"]


def test_every_prompt_moves_only_its_docstring(problems):
    for p in problems:
        ex, prefix = to_example(p), response_prefix(p)
        assert model_prompt(p).endswith("### Response:\n" + prefix)
        assert prefix.rstrip().endswith(":") or p.task_id == "HumanEval/115", p.task_id
        assert ex.input and ex.input.splitlines()[0].strip() not in prefix, p.task_id
        assert raw_prompt(ex) == ex.instruction + "\n\n" + ex.input  # what the router reads
    helper = problems[38]  # decode_cyclic needs encode_cyclic: the helper is shown, not only run
    assert "def encode_cyclic(s: str):" in response_prefix(helper)
    assert response_prefix(problems[115]).endswith("def max_fill(grid, capacity):\n    import math\n")


# --- the stop rule --------------------------------------------------------------------------------

BODY = "    total = 0\n\n    for x in xs:  # a comment inside the body stays\n        total += x\n    return total"


@pytest.mark.parametrize("after", [
    "\n\ndef helper():\n    pass",             # a second function
    "\nclass Foo:\n    pass",
    "\nif __name__ == '__main__':\n    main()",
    "\nprint(f([1, 2]))",
    "\n# tests\nassert f([]) == 0",
    "\nassert f([1]) == 1",                      # any line back at column 0
    "\n\n### Instruction:\nWrite another",       # the next Alpaca example the model dreams up
    "\n\n\n",
])
def test_function_body_stops_where_the_function_ends(after):
    assert function_body(BODY + after) == BODY


def test_function_body_of_a_completion_that_never_starts_a_body_is_empty():
    assert function_body("def f(xs):\n    return 0\n") == ""
    assert function_body("") == ""


# --- pass@1 ---------------------------------------------------------------------------------------

def test_pass_at_1_counts_every_problem_and_its_interval():
    outcomes = [True] * 3 + [False] * 5 + [None] * 2  # 2 problems did not fit: failures, not skipped
    result = pass_at_1(outcomes)
    assert result["pass_at_1"] == pytest.approx(0.3)
    assert (result["passed"], result["n"], result["n_fit"]) == (3, 10, 8)
    assert (result["ci95_low"], result["ci95_high"]) == pytest.approx(wilson_interval(3, 10))
    assert pass_at_1([None, None])["pass_at_1"] == 0.0
    with pytest.raises(ValueError, match="no problems"):
        pass_at_1([])


# --- the evaluation loop, on a stand-in model -----------------------------------------------------

class FakeRun:
    """A stand-in StackedRun: one token per 4 characters, a 200-token context, and a generator that
    answers a fixed body for every problem (recording what it was asked)."""

    def __init__(self, answer):
        self.answer, self.asked = answer, []
        self.tok = SimpleNamespace(encode=lambda text, bos=False: [0] * (len(text) // 4 + bos))
        self.model = SimpleNamespace(cfg=SimpleNamespace(max_seq_len=200))

    def stacks_for(self, mode):
        return {"base": StacksOn.base_only(), "ungated": StacksOn.ungated()}[mode]

    def generate(self, text, mode, max_new_tokens, prompt, repetition_penalty):
        self.asked.append((text, mode, prompt, max_new_tokens, repetition_penalty))
        return {"completion": self.answer(prompt) + "\n\nprint('the model rambles on')\n", "weights": mode}


def test_humaneval_block_on_a_model_that_writes_the_reference(problems):
    by_prompt = {model_prompt(p): p.canonical_solution for p in problems[:12]}
    run = FakeRun(lambda prompt: by_prompt[prompt])
    got = _humaneval(run, "base", EvalConfig(humaneval=12))
    block = got["humaneval"]
    fit = [p for p in problems[:12]
           if len(model_prompt(p)) // 4 + 1 + len(p.canonical_solution) // 4 <= run.model.cfg.max_seq_len]
    assert 0 < len(fit) < 12  # the stand-in's context leaves some problems out
    assert (block["n"], block["n_fit"], block["passed"]) == (12, len(fit), len(fit))
    assert got["accuracy"] == block["pass_at_1"] == len(fit) / 12 and got["n_generated"] == 12
    assert block["passed_ids"] == [p.task_id for p in fit]
    text, mode, prompt, budget, penalty = run.asked[0]
    assert (text, mode, prompt) == (raw_prompt(to_example(fit[0])), StacksOn.base_only(), model_prompt(fit[0]))
    assert budget == run.model.cfg.max_seq_len - (len(prompt) // 4 + 1) and penalty == 1.0


def test_humaneval_block_on_a_model_that_writes_wrong_code(problems):
    run = FakeRun(lambda prompt: "    return 42")
    block = _humaneval(run, "ungated", EvalConfig(humaneval=12))["humaneval"]
    assert block["passed"] == 0 and block["pass_at_1"] == 0.0 and block["n_fit"] == len(run.asked) > 0
    assert _humaneval(run, "base", EvalConfig(humaneval=0)) == {"accuracy": None, "n_generated": 0}
