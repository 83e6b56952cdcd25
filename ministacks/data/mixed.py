"""Mixed-domain prompts for the meta-router: prompts that need two domains' skills at once.

The meta-router (docs/brainstacks.md §6) learns which domains' stacks to switch on for a prompt. Trained
on single-domain prompts alone it would only ever learn to switch on one domain, so it also sees
prompts that need two. Those have no reference answer to score stack combinations with, so they keep
*multi-hot* labels, a 1 for every domain they need; the router's independent sigmoid per domain (not
a softmax) is what lets it output two 1s at once. Every prompt is built around real items of one
corpus split (`load_split`) and lists their `Example.key()`s in `sources`, so the router's own
train/val split can keep prompts that share a source on one side. A corpus item goes into at most one
mixed prompt of a call, which keeps those groups small. The kinds, each with a real prompt
(`DataConfig()`, split "val"; "..." marks where it is shortened here):

  medical+math    a dose calculation around a real HPO finding, HPO disease or ICD-10-CM title; its
                  numbers come from a seeded RNG
      A 42 kg patient is being treated for the following condition: Anti-tissue transglutaminase
      antibody positivity. The ordered dose is 10 mg/kg/day, split into 2 equal doses. How many mg
      is each dose?
  code+math       a real GSM8K-style problem from the math split (never its arithmetic), to be solved by a
                  Python function
      John has a plant stand at the community market. ... how much will he make? Give the result as
      your final answer. Do not include units.
      Don't work it out by hand: write a Python function that calculates the answer and returns it.
  chat+medical    a casual request about a real medical term, opened by a real greeting from the
                  chat corpus while the split has one left (it holds only a few)
      How are you doing? I keep seeing "Abnormal circulating A-type atrial natriuretic peptide
      concentration" on my test results lol. Should I be worried? Keep it simple please.
  reasoning+code  step-by-step reasoning about a real stdlib function: its code (whole, or its first
                  statements when long), or its signature and docstring
      Here is a function from Python's standard library:
      ```python
      def wait(self, timeout=None):
          with self._cond: ...
      ```
      Think step by step: what does it do with its arguments, and what does it return? Trace one
      concrete call to check your answer.

At the default config a val or test split supplies ~75 prompts of each medical kind (they share the
200 medical items, less ICD's non-condition chapters), ~140 code+math and 200 reasoning+code; train
about 13× as many.

    >>> from ministacks.data import DataConfig, mixed_prompts
    >>> p = mixed_prompts(DataConfig(), "train", n_per_kind=100)[0]
    >>> p.kind, p.labels                  # ("medical+math", ("math", "medical"))
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from random import Random

from .example import DOMAINS, DataConfig, Example, check_split, derived_rng
from .math import WORD_SOURCE
from .medical import DEFINE, FEATURES, ICD_CODE
from .splits import load_split

# The router reads the prompt alone (no template, no response): ~150 BPE tokens at ~4 chars/token,
# well inside a CPU sequence and the same size as the single-domain prompts it is trained beside.
MAX_PROMPT_CHARS = 600
MAX_TERM_CHARS = 90    # longer terms are mostly ICD titles that read like forms, not like a condition
MAX_CODE_CHARS = 360   # a longer function is cut between top-level statements, with a marker saying so
MAX_DOC_CHARS = 200    # first paragraph of a docstring, cut at a word boundary
MAX_GREETING_CHARS = 30  # a chat utterance short enough to be only an opener


def _in_domain_order(names: list[str]) -> tuple[str, ...]:
    return tuple(d for d in DOMAINS if d in names)


# kind -> the domains it needs (its multi-hot label), always in DOMAINS order
MIXED_KINDS: dict[str, tuple[str, ...]] = {
    kind: _in_domain_order(kind.split("+")) for kind in ("medical+math", "code+math", "chat+medical", "reasoning+code")
}


def raw_prompt(ex: Example) -> str:
    """The prompt the router sees for a single-domain example: instruction, then input if any."""
    return "\n\n".join(part for part in (ex.instruction, ex.input) if part)


@dataclass(frozen=True)
class MixedPrompt:
    kind: str                 # a key of MIXED_KINDS, e.g. "medical+math"
    text: str                 # the raw prompt (no Alpaca template), like raw_prompt() of a single-domain example
    labels: tuple[str, ...]   # the domains it needs, in DOMAINS order (the router's multi-hot target)
    sources: tuple[str, ...]  # Example.key() of every corpus example whose text went into it

    def to_dict(self) -> dict:
        return {**asdict(self), "labels": list(self.labels), "sources": list(self.sources)}

    @classmethod
    def from_dict(cls, d: dict) -> MixedPrompt:
        return cls(d["kind"], d["text"], tuple(d["labels"]), tuple(d["sources"]))


# --- pulling the real items out of the corpora ----------------------------------------------------

# ICD-10-CM chapters that are not conditions: S–T injuries and poisonings (titles end in "initial
# encounter" and the like), V–Y external causes ("Pedal cycle passenger injured in collision ..."),
# Z factors influencing health status ("Contact with ... hazardous metals").
ICD_NOT_CONDITIONS = frozenset("STVWXYZ")

def medical_term(ex: Example) -> str | None:
    """The condition or finding a medical example names, or None if it names none worth a prompt.

    The term is cut out of the medical builder's own instruction templates, so it is verbatim
    corpus text. ICD codes from ICD_NOT_CONDITIONS name no condition a patient is treated for.
    """
    for template in (DEFINE, FEATURES, ICD_CODE):
        prefix, suffix = re.split(r"\{\w+\}", template)
        if ex.instruction.startswith(prefix) and ex.instruction.endswith(suffix):
            term = ex.instruction[len(prefix) : len(ex.instruction) - len(suffix)].strip()
            if template == ICD_CODE and (ex.answer is None or ex.answer[0] in ICD_NOT_CONDITIONS):
                return None
            return term if 0 < len(term) <= MAX_TERM_CHARS else None
    return None


_GREETING = re.compile(
    r"(hi|hello|hey|greetings|good (morning|afternoon|evening|day)|top of the morning|how are you|"
    r"how do you do|what's up|nice to meet you|it is a pleasure to meet you)\b",
    re.IGNORECASE,
)


def is_greeting(ex: Example) -> bool:
    """A chat utterance that only opens a conversation ("Hello", "How are you doing?")."""
    return len(ex.instruction) <= MAX_GREETING_CHARS and _GREETING.match(ex.instruction) is not None


_SIGNATURE = re.compile(r"`([^`]+)`")


def signature(ex: Example) -> str:
    """`name(args)` or `Class.name(self, ...)` from a code example's instruction."""
    return _SIGNATURE.search(ex.instruction).group(1)


def short_doc(docstring: str) -> str:
    """The docstring's first paragraph on one line, cut at a word boundary past MAX_DOC_CHARS."""
    text = " ".join(docstring.split("\n\n")[0].split())
    if len(text) <= MAX_DOC_CHARS:
        return text
    return text[:MAX_DOC_CHARS].rsplit(" ", 1)[0] + " ..."


def code_head(code: str) -> tuple[str, bool]:
    """The function's source, or if it is longer than MAX_CODE_CHARS its def line and as many whole
    top-level statements of its body as fit (at least one), then a `...` marker; the bool says
    whether it was cut. Cutting between statements, not lines, keeps every block whole, so the head
    still parses and shows complete logic."""
    if len(code) <= MAX_CODE_CHARS:
        return code, False
    lines = code.split("\n")
    body = ast.parse(code).body[0].body  # the code builder only keeps sources that parse
    end = body[0].end_lineno  # the first statement is always kept: a head of no code asks nothing
    for stmt in body[1:]:
        if len("\n".join(lines[: stmt.end_lineno])) > MAX_CODE_CHARS:
            break
        end = stmt.end_lineno
    if end == body[-1].end_lineno:
        return code, False  # nothing would be omitted; the whole-code templates' length check decides
    indent = " " * body[0].col_offset
    return "\n".join(lines[:end] + [f"{indent}...  # rest of the function omitted"]), True


def fenced(code: str) -> str:
    return f"```python\n{code}\n```"


# --- one builder per kind -------------------------------------------------------------------------
# A builder draws its numbers and a random order of its templates, then asks `take` for the next
# unused corpus item of a domain whose finished text fits, trying the next template if none fits.
# None means the split has nothing left for this kind.

Take = Callable[[str, Callable[[Example], bool]], Example | None]
Render = Callable[[Example], str | None]  # None: this template does not apply to that item


def _fits(text: str | None) -> bool:
    return text is not None and len(text) <= MAX_PROMPT_CHARS


def _first_fit(take: Take, domain: str, renders: list[Render]) -> tuple[str, Example] | None:
    for render in renders:
        ex = take(domain, lambda e, render=render: _fits(render(e)))
        if ex is not None:
            return render(ex), ex
    return None


def _shuffled(rng: Random, items: list) -> list:
    return rng.sample(items, len(items))


def _one_source(kind: str, domain: str, take: Take, renders: list[Render]) -> MixedPrompt | None:
    """The prompt of `kind` built from the first item of `domain` that one of `renders` fits, or None."""
    found = _first_fit(take, domain, renders)
    if found is None:
        return None
    text, ex = found
    return MixedPrompt(kind, text, MIXED_KINDS[kind], (ex.key(),))


def dose_questions(rng: Random) -> list[Callable[[str], str]]:
    """Four dose calculations (term -> prompt text), their numbers drawn now from `rng` in ranges a
    ward might see. The prompt's label, not its answer, is what the router trains on, but the
    question must still be well posed: it names every quantity the answer needs."""
    weight = rng.randint(8, 110)  # kg: a small child to a large adult
    per_kg = rng.randint(1, 15)   # mg/kg
    doses = rng.choice((2, 3, 4))
    split_weight = doses * rng.randint(3, 30)  # divisible by `doses`, so each dose is whole mg
    child_weight = rng.randint(4, 40)
    strength = rng.choice((100, 125, 200, 250))  # mg per 5 mL, common oral-solution strengths
    rate, hours = rng.randint(1, 10), rng.randint(2, 12)  # micrograms/kg/min, hours
    return [
        lambda term: (
            f"Diagnosis: {term}.\nThe patient weighs {weight} kg and is prescribed {per_kg} mg/kg of a "
            "medication once daily. How many mg is one dose?"
        ),
        lambda term: (
            f"A {split_weight} kg patient is being treated for the following condition: {term}. The ordered "
            f"dose is {per_kg} mg/kg/day, split into {doses} equal doses. How many mg is each dose?"
        ),
        lambda term: (
            f"Patient problem list: {term}.\nThe child weighs {child_weight} kg and needs {per_kg} mg/kg of a "
            f"medicine that comes as an oral solution of {strength} mg per 5 mL. How many mL should be "
            "given, to one decimal place?"
        ),
        lambda term: (
            f"A {weight} kg patient (diagnosis: {term}) receives an infusion at {rate} micrograms/kg/min. "
            f"How many mg of the drug does the patient receive in {hours} hours?"
        ),
    ]


def medical_math(take: Take, rng: Random) -> MixedPrompt | None:
    questions = _shuffled(rng, dose_questions(rng))
    return _one_source("medical+math", "medical", take, [lambda e, q=q: q(medical_term(e)) for q in questions])


CODE_MATH = (
    "Write a Python function `solve()` that returns the answer to this word problem as a number.\n\n{q}",
    "{q}\n\nDon't work it out by hand: write a Python function that calculates the answer and returns it.",
    ("Turn this word problem into code. Write `def answer():` so that it computes and returns the final "
     "number, with one variable per quantity in the problem.\n\n{q}"),
)


def code_math(take: Take, rng: Random) -> MixedPrompt | None:
    templates = _shuffled(rng, list(CODE_MATH))
    return _one_source("code+math", "math", take, [lambda e, t=t: t.format(q=raw_prompt(e)) for t in templates])


CHAT_MEDICAL = (
    'so my doctor mentioned "{term}" and now I\'m a bit worried. What is that, in plain words?',
    ('random question: my friend just found out she has "{term}". Can you explain what that means, like '
     "you would to a friend?"),
    'I keep seeing "{term}" on my test results lol. Should I be worried? Keep it simple please.',
    'could we chat about "{term}" for a minute? I\'d love to get it without all the medical jargon.',
)


def chat_medical(take: Take, rng: Random) -> MixedPrompt | None:
    templates = _shuffled(rng, list(CHAT_MEDICAL))
    found = _first_fit(take, "medical", [lambda e, t=t: t.format(term=medical_term(e)) for t in templates])
    if found is None:
        return None
    body, ex = found
    body, sources = body[0].upper() + body[1:], (ex.key(),)
    # a split holds only a few greetings; once they are used up the casual request stands alone
    opener = take("chat", lambda e: _fits(f"{e.instruction}! {body}"))
    if opener is not None:
        greeting = opener.instruction if opener.instruction[-1] in ".!?" else opener.instruction + "!"
        body, sources = f"{greeting} {body}", (opener.key(), ex.key())
    return MixedPrompt("chat+medical", body, MIXED_KINDS["chat+medical"], sources)


# "{code}" is the whole function; "{head}" its first statements, for functions too long to show whole
REASONING_CODE = (
    ("Here is a function from Python's standard library:\n\n{code}\n\nThink step by step: what does it do "
     "with its arguments, and what does it return? Trace one concrete call to check your answer."),
    ("Read this Python code carefully:\n\n{code}\n\nReason through it line by line: is there an input for "
     "which it raises an exception? Name one and explain why, or argue why there is none."),
    ('`{sig}` is documented as: "{doc}"\n\nWithout seeing its code, reason step by step: which edge cases '
     "must an implementation handle, and what should it do in each?"),
    ('The docstring of `{sig}` says: "{doc}"\n\nIts code is:\n\n{code}\n\nCheck step by step whether the '
     "code does everything the docstring promises."),
    ("Here is the beginning of `{sig}` from Python's standard library; the rest is omitted:\n\n{head}\n\n"
     "Reason step by step through the lines shown: what must be true of the arguments for execution to "
     "get past them without an exception?"),
)


def code_question(template: str, ex: Example) -> str | None:
    """The template filled in from a code example, or None where it does not apply: a whole-code
    template to a function too long to show, or the "beginning of" template to one shown whole."""
    head, cut = code_head(ex.response)
    if ("{code}" in template and cut) or ("{head}" in template and not cut):
        return None
    code = fenced(head)
    return template.format(code=code, head=code, sig=signature(ex), doc=short_doc(ex.input))


def reasoning_code(take: Take, rng: Random) -> MixedPrompt | None:
    templates = _shuffled(rng, list(REASONING_CODE))
    return _one_source("reasoning+code", "code", take, [lambda e, t=t: code_question(t, e) for t in templates])


BUILDERS: dict[str, Callable[[Take, Random], MixedPrompt | None]] = {
    "medical+math": medical_math, "code+math": code_math, "chat+medical": chat_medical, "reasoning+code": reasoning_code,
}
# which corpus items each domain can lend at all; the per-template length check happens in `take`
USABLE: dict[str, Callable[[Example], bool]] = {
    "medical": lambda e: medical_term(e) is not None,
    # word problems only: "Turn this word problem into code" does not fit "Calculate 5 * 3."
    "math": lambda e: e.source == WORD_SOURCE and len(raw_prompt(e)) <= MAX_PROMPT_CHARS,
    "chat": is_greeting,
    "code": lambda e: _SIGNATURE.search(e.instruction) is not None,
}


def mixed_prompts(cfg: DataConfig, split: str, n_per_kind: int, seed: int = 0, cache: Path | None = None) -> list[MixedPrompt]:
    """Up to `n_per_kind` prompts of every kind in MIXED_KINDS from one split's corpora, returned
    kind by kind in MIXED_KINDS order.

    Deterministic in (cfg, split, n_per_kind, seed). Each corpus item goes into at most one prompt,
    so a split with too few items yields fewer prompts instead of repeats. Kinds that share a
    domain (medical) draw from it in turns, so neither starves the other.
    """
    check_split(split)
    if n_per_kind < 0:
        raise ValueError(f"n_per_kind must be >= 0, got {n_per_kind}")
    pools = {}
    for domain, usable in USABLE.items():
        pool = [ex for ex in load_split(domain, split, cfg, cache) if usable(ex)]
        derived_rng(cfg.seed, "mixed", split, str(seed), domain).shuffle(pool)
        pools[domain] = pool

    def take(domain: str, fits: Callable[[Example], bool]) -> Example | None:
        pool = pools[domain]
        for i, ex in enumerate(pool):
            if fits(ex):
                return pool.pop(i)
        return None

    rngs = {kind: derived_rng(cfg.seed, "mixed", split, str(seed), kind) for kind in MIXED_KINDS}
    made: dict[str, list[MixedPrompt]] = {kind: [] for kind in MIXED_KINDS}
    active = [kind for kind in MIXED_KINDS if n_per_kind > 0]
    while active:  # every pass adds a prompt to each active kind or retires it: it ends
        for kind in list(active):
            prompt = BUILDERS[kind](take, rngs[kind])
            if prompt is not None:
                made[kind].append(prompt)
            if prompt is None or len(made[kind]) == n_per_kind:
                active.remove(kind)
    return [p for kind in MIXED_KINDS for p in made[kind]]
