"""Math domain: GSM8K-style word problems and single-step arithmetic, both from reasoning-gym (Apache-2.0).

GSM8K itself is not packaged anywhere installable offline; `gsm_symbolic` re-instantiates 100 GSM8K
templates with fresh numbers and ships the worked solution in `metadata["answer_cot"]`, which ends
with GSM8K's own `#### N` line. So the response format is exactly the paper's math data, and the
evaluator can score a generation by the number after "####" (docs/brainstacks.md §9).

A model of a few million parameters never solves a word problem, so on word problems alone every
model scores 0% and the math accuracy cannot show a difference between them. A share of the domain
(DataConfig.arithmetic_share) is therefore `basic_arithmetic` with two terms of one or two digits,
"Calculate 85 / 17.", answered in the same format, so one scorer serves both:

    word problem   instruction  the question         response  the step-by-step solution, ending "#### N"
    arithmetic     instruction  "Calculate 85 / 17."  response  "85 / 17 = 5\\n#### 5"
    both           input        ""                   answer    N, as a string (an integer for arithmetic)

`source_shares` tells splits.make_splits to give each generator its share of *every* split, so the
test split's arithmetic is a fixed count that two runs can be compared on.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from fractions import Fraction

from .example import DataConfig, Example

GENERATOR = "gsm_symbolic"
ARITHMETIC = "basic_arithmetic"
WORD_SOURCE, ARITHMETIC_SOURCE = f"reasoning-gym:{GENERATOR}", f"reasoning-gym:{ARITHMETIC}"
# one operation on two numbers of 1-2 digits (the generator's defaults go up to 6 terms of 4 digits)
ARITHMETIC_SETTINGS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
ANSWER_MARK = "#### "
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


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


def exact_value(node: ast.expr) -> Fraction:
    """The value of an arithmetic expression's syntax tree in exact rationals, "/" a true division."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -exact_value(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](exact_value(node.left), exact_value(node.right))
    raise ValueError(f"not +, -, *, / on integers: {ast.unparse(node)!r}")


def arithmetic_example(expression: str, answer: str) -> Example | None:
    """The example 'Calculate {expression}.' answered '{expression} = {answer}\\n#### {answer}', or None.

    The gym computes its answer with floor division ("/" evaluated as "//"). It picks divisors that
    divide exactly, but an item whose answer is not the exact value, or not an integer, would teach a
    wrong number and is dropped. The expression is rewritten in one spelling (ast.unparse: "( 5 * 3 )"
    becomes "5 * 3"), so that two spellings of one question are one prompt to dedupe, never a pair
    split between train and test.
    """
    try:
        tree = ast.parse(expression, mode="eval")
        value = exact_value(tree.body)
    except (SyntaxError, ValueError, ZeroDivisionError):
        return None
    if not re.fullmatch(r"-?\d+", answer) or value != int(answer):
        return None
    expression = ast.unparse(tree)
    return Example("math", f"Calculate {expression}.", "", f"{expression} = {answer}\n{ANSWER_MARK}{answer}",
                   answer, ARITHMETIC_SOURCE)


def source_shares(cfg: DataConfig) -> dict[str, float] | None:
    """Each generator's share of every split, for splits.make_splits; None (one pool) for word problems only."""
    if cfg.arithmetic_share == 0:
        return None
    return {ARITHMETIC_SOURCE: cfg.arithmetic_share, WORD_SOURCE: 1.0 - cfg.arithmetic_share}


def word_problems(size: int, seed: int) -> list[Example]:
    import reasoning_gym  # imported here: it takes ~1 s and is only needed on a cache miss

    examples = []
    for item in reasoning_gym.create_dataset(GENERATOR, size=size, seed=seed) if size else []:
        answer = str(item["answer"]).strip()
        response = solution_with_answer(item["metadata"]["answer_cot"], answer)
        if response is None:
            continue  # a solution whose #### line disagrees with the answer would teach a wrong number
        examples.append(Example("math", item["question"].strip(), "", response, answer, WORD_SOURCE))
    return examples


def arithmetic(size: int, seed: int, ops: str = "+-*/", signed: bool = True) -> list[Example]:
    import reasoning_gym

    # unsigned: the generator's "simple" task, whose numbers run from 0 to 10^digits (its default draws signed ones)
    settings = {**ARITHMETIC_SETTINGS, "operators": tuple(ops), **({} if signed else {"allow_parentheses": False})}

    items = reasoning_gym.create_dataset(ARITHMETIC, size=size, seed=seed, **settings) if size else []
    examples = (arithmetic_example(item["metadata"]["expression"], str(item["answer"]).strip()) for item in items)
    return [ex for ex in examples if ex is not None]


def build(cfg: DataConfig) -> list[Example]:
    # each generator makes `oversample` times its share of max_examples, so that dedupe and the length
    # filter still leave enough (one-digit sums repeat often; long word-problem solutions are dropped)
    n_arithmetic = round(cfg.arithmetic_share * cfg.max_examples)
    return (word_problems(int((cfg.max_examples - n_arithmetic) * cfg.oversample), cfg.seed)
            + arithmetic(int(n_arithmetic * cfg.oversample), cfg.seed, cfg.arithmetic_ops, cfg.arithmetic_signed))
