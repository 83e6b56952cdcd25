"""Rewards that are checked, not judged: one plain function per domain, `(prompt, completion, example) -> float`.

RL needs a number per completion. Every one here is the evaluation's own check (evaluation/tasks.py,
evaluation/humaneval.py), so "reward went up" and "accuracy went up" say the same thing:

    domain     reward 1.0 when                                                  the check
    math       the number after '####' (else the last number) equals the answer tasks.score_math
    reasoning  the text after </think> equals the answer                        tasks.score_reasoning
    medical    ICD-10-CM examples: the first code-like token is the code        tasks.score_medical
    code       a HumanEval-style problem's unit tests pass in the sandbox       humaneval.run_tests

and 0.0 otherwise. Never the format alone: a completion that *looks* like an answer ("#### 7", a `def`
that parses) earns nothing unless it is the answer. Chat has no checkable answer, so it has no reward
(DPO learns it from pairs instead), nor have the HPO definitions of medical or the stdlib functions of
code (no unit tests): asking for one is a ValueError, not a silent 0.

`prompt` is what the model was conditioned on; the checks need only the completion and the example, and
it is in the signature so that a reward which does read it (a length penalty relative to the question,
a judge) fits the same slot.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from ..data.example import Example
from ..evaluation import humaneval
from ..evaluation.tasks import score_math, score_medical, score_reasoning

Reward = Callable[[str, str, Example], float]

HUMANEVAL_SOURCE = "human-eval:"  # humaneval.to_example's source prefix: the example carries its task id


def math_reward(prompt: str, completion: str, example: Example) -> float:
    return float(score_math(completion, _answer(example)))


def reasoning_reward(prompt: str, completion: str, example: Example) -> float:
    return float(score_reasoning(completion, _answer(example)))


def medical_reward(prompt: str, completion: str, example: Example) -> float:
    if example.answer is None:
        raise ValueError("a medical reward needs an ICD-10-CM example (an answer to check); HPO definitions "
                         "have none (their word-overlap score is a judgement, not a check)")
    return float(score_medical(completion, example)["correct"])


@lru_cache(maxsize=1)
def _problems() -> dict[str, humaneval.Problem]:
    return {p.task_id: p for p in humaneval.load_problems()}


def code_reward(prompt: str, completion: str, example: Example, timeout: float = humaneval.TIMEOUT) -> float:
    """1.0 when the completion's function body passes the problem's unit tests, run in the sandbox
    (humaneval.run_tests: a child process with time, memory, file and network limits)."""
    if not example.source.startswith(HUMANEVAL_SOURCE):
        raise ValueError(f"a code reward needs a problem with unit tests (humaneval.to_example); "
                         f"{example.source!r} has none, and a format check is not a reward")
    problem = _problems()[example.source[len(HUMANEVAL_SOURCE):]]
    return float(humaneval.run_tests(problem, humaneval.function_body(completion), timeout=timeout)["passed"])


REWARDS: dict[str, Reward] = {"math": math_reward, "reasoning": reasoning_reward, "medical": medical_reward,
                              "code": code_reward}


def reward_for(domain: str) -> Reward:
    if domain not in REWARDS:
        raise ValueError(f"{domain} has no checkable reward (rewards exist for {', '.join(REWARDS)}): "
                         "align it with DPO instead")
    return REWARDS[domain]


def rewardable(domain: str, example: Example) -> bool:
    """Can `reward_for(domain)` check this example? (math and reasoning: all; medical: the ICD half; code:
    the HumanEval problems)."""
    if domain == "code":
        return example.source.startswith(HUMANEVAL_SOURCE)
    return domain in REWARDS and example.answer is not None


def _answer(example: Example) -> str:
    if example.answer is None:
        raise ValueError(f"no answer to check in this example: {example.instruction[:80]!r}")
    return example.answer
