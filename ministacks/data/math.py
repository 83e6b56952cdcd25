"""Math domain: GSM8K-style word problems from reasoning-gym's `gsm_symbolic` generator (Apache-2.0).

GSM8K itself is not packaged anywhere installable offline; `gsm_symbolic` re-instantiates 100 GSM8K
templates with fresh numbers and ships the worked solution in `metadata["answer_cot"]`, which ends
with GSM8K's own `#### N` line. So the response format is exactly the paper's math data, and the
evaluator can score a generation by the number after "####" (docs/brainstacks.md §9).

    instruction  the question        response  the step-by-step solution, ending "#### N"
    input        ""                  answer    N, as a string
"""

from __future__ import annotations

import math

from .example import DataConfig, Example

GENERATOR = "gsm_symbolic"
ANSWER_MARK = "#### "


def _same_number(a: str, b: str) -> bool:
    try:
        return math.isclose(float(a), float(b))
    except ValueError:
        return False


def solution_with_answer(cot: str, answer: str) -> str | None:
    """The worked solution with its last line made exactly `#### {answer}`, or None if it disagrees.

    Some templates print the final line as a float ("#### 15.0") while `answer` is "15"; GSM8K
    style and the evaluator want the integer form, so the line is rewritten when the values agree.
    """
    lines = cot.rstrip().split("\n")
    last = lines[-1].strip()
    if not last.startswith(ANSWER_MARK) or not _same_number(last[len(ANSWER_MARK):], answer):
        return None
    return "\n".join(lines[:-1] + [ANSWER_MARK + answer])


def build(cfg: DataConfig) -> list[Example]:
    import reasoning_gym  # imported here: it takes ~1 s and is only needed on a cache miss

    size = int(cfg.max_examples * cfg.oversample)
    items = reasoning_gym.create_dataset(GENERATOR, size=size, seed=cfg.seed)
    examples = []
    for item in items:
        answer = str(item["answer"]).strip()
        response = solution_with_answer(item["metadata"]["answer_cot"], answer)
        if response is None:
            continue  # a solution whose #### line disagrees with the answer would teach a wrong number
        examples.append(Example("math", item["question"].strip(), "", response, answer, f"reasoning-gym:{GENERATOR}"))
    return examples
