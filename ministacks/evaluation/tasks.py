"""Checkable task accuracy per domain: did a generation get the example right?

The paper scores generations per domain (docs/brainstacks.md §9: GSM8K greedy, "the number after '####'
or else the last number"). Our five domains (ministacks/data) make that check concrete as follows;
`CHECKS` holds the same table as data, for reports:

    domain     correct when                                                     scorer
    math       the generation's number == the answer (after "####", else last)  score_math
    reasoning  the text after </think> == the answer (case, spaces, final "." ignored)  score_reasoning
    medical    ICD-10-CM: the first code-like token == the code                 score_medical
               HPO definition / feature list: content-word F1 >= 0.5 vs the reference
    code       nothing checkable on the stdlib split (correct is None): it has  check_code_format
               no unit tests, so only a FORMAT CHECK runs there (parses, and
               defines a callable of the requested name and parameter names);
               the code domain's accuracy is HumanEval pass@1 (humaneval.py)
    chat       nothing checkable: correct is None                               (score)

`score(domain, example, generated)` dispatches and always returns a dict with the key "correct"
(True/False, or None for chat and code), plus what the scorer saw ("predicted", "f1", "reason",
and for code "format_ok").

Why the stdlib split gets a format check and not a behaviour check: comparing the generated function
with the original needs inputs to call both on, and the only inputs the data has are doctests. Only
7 of the 200 quick-preset test functions have any, and 5 of those 7 are methods that need an instance
of their class — behaviour could be checked on 1% of the split. A check that `def isabs(s): return 42`
passes is not accuracy, so it is reported under its own name (`format_ok`), never as "accuracy".

`wilson_interval` gives a 95% interval for any of these shares (a pass rate on 20 examples is
±20 points; the interval says so).

Everything here is a pure function of its inputs except `check_code_format`, which runs a subprocess
(deterministic all the same: same code, same verdict).
"""

from __future__ import annotations

import ast
import hashlib
import math
import re
from collections import Counter
from statistics import NormalDist

from ..data.example import Example, check_domain
from .sandbox import run_python

CHECKS: dict[str, str] = {
    "math": "the number after the last '####' (else the last number) equals the answer",
    "reasoning": "the text after </think> equals the answer, ignoring case, spacing and a final period",
    "medical": "ICD-10-CM: first code-like token equals the code; HPO definitions and feature lists: "
               "content-word F1 >= 0.5 against the reference",
    "code": "format check only, not accuracy (the stdlib split has no unit tests): parses, and defining it "
            "in the sandbox yields a callable with the requested name and parameter names; the code domain's "
            "accuracy is HumanEval pass@1 (its unit tests run in the sandbox)",
    "chat": "nothing checkable (correct is None)",
}

# --- math -----------------------------------------------------------------------------------------

ANSWER_MARK = "####"  # GSM8K's final-answer line, kept verbatim by data/math.py
# A number as written in a solution: optional sign (only where it cannot be a minus between two
# terms, as in "10-3"), optional "$", thousands groups "2,310" or plain digits, optional decimals.
_NUMBER = re.compile(r"(?:(?<![\w.])-)?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?:(?<![\w.])-)?\$?\.\d+")


def normalise_number(text: str) -> str:
    """One spelling per value: "$2,310.00", "2310.0" and "2310" all become "2310"; "-0.50" → "-0.5"."""
    sign = "-" if text.startswith("-") else ""
    digits = text.lstrip("-").replace("$", "").replace(",", "")
    whole, _, fraction = digits.partition(".")
    whole, fraction = whole.lstrip("0") or "0", fraction.rstrip("0")
    value = f"{whole}.{fraction}" if fraction else whole
    return "0" if value == "0" else sign + value


def extract_number(text: str) -> str | None:
    """The generation's final answer as a normalised number string, or None if it gives none.

    With a "####" line, the first number after the last "####" (None if nothing follows it: the
    answer line was started but never written). Without one, the last number in the text.
    """
    if ANSWER_MARK in text:
        found = _NUMBER.search(text.rsplit(ANSWER_MARK, 1)[1])
    else:
        found = None
        for found in _NUMBER.finditer(text):
            pass  # keep the last
    return normalise_number(found.group()) if found else None


def score_math(generated: str, answer: str) -> bool:
    predicted = extract_number(generated)
    return predicted is not None and predicted == extract_number(answer)


# --- reasoning ------------------------------------------------------------------------------------

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def final_answer(generated: str) -> str | None:
    """The part after the reasoning trace: the text after the last </think>; the whole text if there
    is no trace; None if a trace was opened but never closed (the model ran out of tokens thinking)."""
    if THINK_CLOSE in generated:
        return generated.rsplit(THINK_CLOSE, 1)[1]
    return None if THINK_OPEN in generated else generated


def normalise_answer(text: str) -> str:
    """Lowercase, whitespace collapsed, no final period: "Chloe is a pioneer." == "chloe is a  pioneer"."""
    return " ".join(text.lower().split()).rstrip(".").rstrip()


def score_reasoning(generated: str, answer: str) -> bool:
    predicted = final_answer(generated)
    return predicted is not None and normalise_answer(predicted) == normalise_answer(answer)


# --- medical --------------------------------------------------------------------------------------

DEFINITION_F1_THRESHOLD = 0.5  # our choice: half the reference's content words, at matching precision
# ICD-10-CM: a letter, two digits/letters, then optionally "." and up to four more ("A00.9", "S89.032D")
_ICD_CODE = re.compile(r"\b[A-Z][0-9][0-9A-Z](?:\.[0-9A-Z]{1,4})?\b", re.IGNORECASE)
# Function words that carry no medical content; "include" is the feature lists' header verb.
STOP_WORDS = frozenset({
    "a", "an", "and", "any", "are", "as", "at", "be", "been", "being", "but", "by", "can", "for", "from",
    "has", "have", "in", "include", "includes", "including", "into", "is", "it", "its", "may", "not", "of",
    "on", "or", "such", "that", "the", "their", "there", "these", "this", "those", "to", "was", "were",
    "which", "with", "without",
})


def content_words(text: str, drop: frozenset[str] = frozenset()) -> list[str]:
    """Lowercase alphanumeric words, without STOP_WORDS, punctuation and the words in `drop`."""
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOP_WORDS and w not in drop]


def unigram_f1(generated: list[str], reference: list[str]) -> float:
    """SQuAD-style F1 over word multisets: 2·P·R/(P+R), P = overlap/|generated|, R = overlap/|reference|.
    Two empty lists agree (1.0); one empty list agrees with nothing (0.0)."""
    if not generated or not reference:
        return float(generated == reference)
    overlap = sum((Counter(generated) & Counter(reference)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(generated), overlap / len(reference)
    return 2 * precision * recall / (precision + recall)


def score_medical(generated: str, example: Example) -> dict:
    """ICD examples (answer = the code): exact match of the first code-like token, case-insensitive.

    HPO examples (no answer): content-word F1 against the reference response. Words of the question
    do not count on either side: otherwise echoing "Clinical features of <disease> include:" scores
    F1 > 0.5 on a third of the feature lists without naming a single feature.
    """
    if example.answer is not None:
        found = _ICD_CODE.search(generated)
        correct = found is not None and found.group().upper() == example.answer.strip().upper()
        return {"correct": correct, "f1": None, "kind": "code"}
    asked = frozenset(content_words(example.instruction))
    f1 = unigram_f1(content_words(generated, asked), content_words(example.response, asked))
    return {"correct": f1 >= DEFINITION_F1_THRESHOLD, "f1": f1, "kind": "definition"}


# --- code -----------------------------------------------------------------------------------------

# "Write a Python function `isabs(s)` ...", "Write the method `EnumType.__setattr__(cls, name, value)` ..."
_SIGNATURE = re.compile(r"`(?P<name>[A-Za-z_][\w.]*)\((?P<args>.*?)\)`", re.DOTALL)

# Appended to the generated code and run in the same module, so module-level code has run first.
# It looks the name up and reads its signature but never calls it: a body that needs a module global
# the snippet lacks (NameError at call time) still passes; a decorator or default value that needs
# one fails, because that happens at definition time. Builtins are reached through `_b` because the
# snippet may define a function called `list` or `print`.
_CHECKER = '''

# --- ministacks.evaluation.tasks.check_code_format: check the definition, never call it ---
import builtins as _b
import inspect as _inspect


def _ministacks_verdict(name, wanted):
    if name not in _b.globals():
        return "`" + name + "` is not defined"
    found = _b.globals()[name]
    if _b.isinstance(found, _b.property):  # a method written with @property
        found = found.fget
    elif _b.isinstance(found, (_b.staticmethod, _b.classmethod)):
        found = found.__func__
    if not _b.callable(found):
        return "`" + name + "` is not callable"
    try:
        params = _b.list(_inspect.signature(found).parameters)
    except (_b.TypeError, _b.ValueError) as e:
        return "no signature: " + _b.str(e)
    if params != wanted:
        return "parameters " + _b.repr(params) + " != requested " + _b.repr(wanted)
    return "ok"


_b.print()
_b.print({marker!r}, _ministacks_verdict({name!r}, {params!r}))
'''


def requested_signature(instruction: str) -> tuple[str, list[str]] | None:
    """(function name, parameter names) of the first `name(args)` in backticks, or None.

    "`EnumType.__setattr__(cls, name, value)`" → ("__setattr__", ["cls", "name", "value"]): a method
    is written as a top-level def. The argument list is parsed by `ast`, so defaults, *args, **kwargs
    and the / and * markers count exactly as Python counts them (markers are not parameters).
    """
    found = _SIGNATURE.search(instruction)
    if found is None:
        return None
    name = found["name"].rsplit(".", 1)[-1]
    try:
        tree = ast.parse(f"def _f({found['args']}): pass")
    except SyntaxError:
        return None
    args = tree.body[0].args
    params = [a.arg for a in args.posonlyargs + args.args]
    params += [args.vararg.arg] if args.vararg else []
    params += [a.arg for a in args.kwonlyargs]
    params += [args.kwarg.arg] if args.kwarg else []
    return name, params


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def check_code_format(generated: str, example: Example, timeout: float = 5.0) -> dict:
    """A FORMAT CHECK, not a correctness check (the stdlib split has no unit tests, see the module
    docstring): the whole completion must parse, and running it (with `_CHECKER` appended) in the
    sandbox must define a callable with the requested name and exactly the requested parameter names,
    without raising. The function is never called, so `def isabs(s): return 42` passes.

    Returns {"format_ok": bool, "reason": "ok" or why not}.
    """
    wanted = requested_signature(example.instruction)
    if wanted is None:
        return {"format_ok": False, "reason": "instruction names no `name(args)` signature"}
    try:
        ast.parse(generated)
    except (SyntaxError, ValueError) as e:  # ValueError: a null byte in the source
        return {"format_ok": False, "reason": f"syntax error: {e}"}
    # the verdict line starts with a marker derived from the code itself: a snippet cannot contain its
    # own hash, so it cannot print a verdict by accident, and the same code always gets the same marker
    marker = "ministacks-verdict-" + hashlib.sha256(generated.encode()).hexdigest()[:16]
    name, params = wanted
    result = run_python(generated + _CHECKER.format(marker=marker, name=name, params=params), timeout=timeout)
    if result.timed_out:
        return {"format_ok": False, "reason": f"timed out after {timeout:g} s"}
    verdicts = [line for line in result.stdout.splitlines() if line.startswith(marker + " ")]
    if verdicts:
        verdict = verdicts[-1].removeprefix(marker + " ")
        return {"format_ok": verdict == "ok", "reason": verdict}
    if result.returncode != 0:
        return {"format_ok": False, "reason": f"raised: {_last_line(result.stderr) or f'exit status {result.returncode}'}"}
    return {"format_ok": False, "reason": "exited before the check ran"}


# --- a 95% interval for any of these shares -------------------------------------------------------

Z_95 = NormalDist().inv_cdf(0.975)  # 1.95996...: the two-sided 95% point of the standard normal


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial share k/n (Wilson 1927): the p for which the observed share
    is within z standard errors, |k/n - p| <= z·sqrt(p(1-p)/n). Solving that quadratic in p gives

        centre = (p̂ + z²/2n) / (1 + z²/n),   half-width = z/(1 + z²/n) · sqrt(p̂(1-p̂)/n + z²/4n²)

    Unlike the textbook p̂ ± z·sqrt(p̂(1-p̂)/n), it stays inside [0, 1] and does not shrink to a point
    at 0/n or n/n — which is where small models on HumanEval live (0 of 164 is not "exactly 0%").
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"a Wilson interval needs 0 <= successes <= n and n >= 1, got {successes} of {n}")
    share, z2 = successes / n, z * z
    centre = (share + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(share * (1 - share) / n + z2 / (4 * n * n))
    # at 0/n and n/n the bound is exactly 0 (or 1): set it, or float rounding leaves it a hair inside the
    # share (a negative error bar); elsewhere the share lies strictly inside
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


# --- all domains ----------------------------------------------------------------------------------

def score(domain: str, example: Example, generated: str, code_timeout: float = 5.0) -> dict:
    """Score one generation for `example` of `domain`; the dict always has "correct" (see CHECKS).
    Code (stdlib split): "correct" is None and "format_ok" holds the format check's verdict.
    `code_timeout`: seconds a generated function's sandboxed run may take (code only)."""
    check_domain(domain)
    if domain in ("math", "reasoning") and example.answer is None:
        raise ValueError(f"a {domain} example needs a checkable answer, but this one has none: {example.instruction[:80]!r}")
    if domain == "math":
        return {"correct": score_math(generated, example.answer), "predicted": extract_number(generated)}
    if domain == "reasoning":
        return {"correct": score_reasoning(generated, example.answer), "predicted": final_answer(generated)}
    if domain == "medical":
        return score_medical(generated, example)
    if domain == "code":  # no unit tests in the stdlib split: a format check, reported as one
        return {"correct": None, **check_code_format(generated, example, timeout=code_timeout)}
    return {"correct": None}  # chat: open-ended replies, no reference answer to check
