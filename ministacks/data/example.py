"""One training example, the Alpaca template it is rendered with, and the data config.

- `DOMAINS`: the five domains, in the order the continual curriculum trains them (docs/brainstacks.md §4).
- `render_alpaca`: the paper's prompt template (docs/brainstacks.md §10), always the with-input variant, so every
  domain shares one format and the router sees the same prefix everywhere.
- `Example`: (instruction, input, response) plus a checkable `answer` where the domain has one
  and a `source` that says which file or generator the text came from.
- `DataConfig`: every knob of the data recipe; its fields feed the cache key (`splits.py`).
- `normalise_prompt`: the key used for deduplication and for proving splits are disjoint.
- `derived_rng`: one independent, reproducible RNG per (seed, purpose).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, fields

DOMAINS: tuple[str, ...] = ("chat", "code", "math", "medical", "reasoning")  # curriculum order
SPLITS: tuple[str, ...] = ("train", "val", "test")

# The paper's template, verbatim (docs/brainstacks.md §10). The eos token is *not* part of the text:
# the tokenizer appends its id, so no model ever sees a literal "<eos>" string.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{response}"
)

# reasoning-gym generators used by the reasoning domain: short prompts, an answer string that the
# gym can check, and metadata rich enough to write a short <think> trace (see reasoning.py).
REASONING_TASKS: tuple[str, ...] = (
    "syllogism", "family_relationships", "knights_knaves", "letter_counting", "leg_counting", "count_bits",
)


def render_alpaca(instruction: str, input: str, response: str | None = None) -> str:
    """The paper's Alpaca prompt; with `response=None` it stops right after "### Response:\\n"."""
    return ALPACA_TEMPLATE.format(instruction=instruction, input=input, response=response or "")


def normalise_prompt(instruction: str, input: str) -> str:
    """Lowercase, whitespace-collapsed instruction + input: two prompts that differ only in case or
    spacing are the same question, and must not land in different splits."""
    return " ".join(f"{instruction} {input}".lower().split())


@dataclass(frozen=True)
class Example:
    domain: str            # one of DOMAINS, or a user's own name for load_user_data
    instruction: str
    input: str             # "" when the task has no separate input (the template still shows the header)
    response: str
    answer: str | None     # checkable answer (math number, reasoning answer, ICD code), else None
    source: str            # where the text came from, e.g. "reasoning-gym:syllogism"

    def prompt(self) -> str:
        """Everything the model is conditioned on: the template up to and including "### Response:\\n"."""
        return render_alpaca(self.instruction, self.input)

    def text(self) -> str:
        """prompt() + response: the full training sequence (the loss is usually masked to the response)."""
        return render_alpaca(self.instruction, self.input, self.response)

    def key(self) -> str:
        return normalise_prompt(self.instruction, self.input)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Example:
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"Example dict is missing {missing}; it has {sorted(d)}")
        return cls(**{n: d[n] for n in names})


@dataclass(frozen=True)
class DataConfig:
    seed: int = 0                     # one seed for generators, shuffles and splits: same cfg → same data
    max_examples: int = 3000          # per domain, cap after dedupe and before splitting (CPU budget)
    n_val: int = 200                  # the paper's null-space sample is n=200 for TinyLlama (docs/brainstacks.md §5, §9)
    n_test: int = 200                 # held out for the forgetting matrix and the router's evaluation
    max_response_chars: int = 2000    # the paper cut responses at 2000 chars (docs/brainstacks.md §9)
    max_example_chars: int = 1200     # whole rendered example; CPU sequences are ~256 BPE tokens at
                                      # ~4 chars/token (+ the 190-char template), so longer ones are dropped
    oversample: float = 2.0           # procedural/mixed sources produce this × max_examples candidates so
                                      # that dedupe and the length filter still leave max_examples
    reasoning_tasks: tuple[str, ...] = REASONING_TASKS  # reasoning-gym generators, mixed round-robin
    max_disease_features: int = 8     # a disease lists at most this many HPO features (keeps it < max_example_chars)
    arithmetic_share: float = 0.5     # share of the math domain that is single-step arithmetic (math.py), in
                                      # every split: word problems alone are never solved at CPU size, so the
                                      # math accuracy could not tell one model from another. Half: 100 of the
                                      # 200 test examples, enough for a 95% interval within ±10 points on
                                      # the task a small model can answer. 0: word problems only
    arithmetic_ops: str = "+-*/"      # the arithmetic's operators (a subset of "+-*/"), and whether its numbers
    arithmetic_signed: bool = True    # may be negative (False: 0 to 100): "+" unsigned is the easiest (scale/rl.py)
    hub: str = ""                     # "": the embedded corpora; "tinyllama" / "gemma": the paper's data sets for
                                      # that base, from the Hugging Face hub (hub.py), through the same recipe

    def __post_init__(self):
        # a list would make the config unhashable and its cache key depend on the container type
        object.__setattr__(self, "reasoning_tasks", tuple(self.reasoning_tasks))
        if min(self.n_val, self.n_test) < 1:
            raise ValueError(f"n_val and n_test must be >= 1, got n_val={self.n_val}, n_test={self.n_test}")
        if self.max_examples <= self.n_val + self.n_test:
            raise ValueError(
                f"max_examples={self.max_examples} leaves no training data after n_val={self.n_val} "
                f"+ n_test={self.n_test}; raise max_examples or lower n_val/n_test"
            )
        if self.oversample < 1.0:
            raise ValueError(f"oversample must be >= 1.0, got {self.oversample}")
        if not 0.0 <= self.arithmetic_share <= 1.0:
            raise ValueError(f"arithmetic_share must be in [0, 1] (0: word problems only), got {self.arithmetic_share}")
        if not self.arithmetic_ops or set(self.arithmetic_ops) - set("+-*/"):
            raise ValueError(f"arithmetic_ops must be a non-empty subset of '+-*/', got {self.arithmetic_ops!r}")
        if self.hub not in ("", "tinyllama", "gemma"):
            raise ValueError(f"hub must be '', 'tinyllama' or 'gemma' (the paper's data sets), got {self.hub!r}")
        unknown = sorted(set(self.reasoning_tasks) - set(REASONING_TASKS))
        if unknown or not self.reasoning_tasks:
            raise ValueError(f"reasoning_tasks must be a non-empty subset of {REASONING_TASKS}, got unknown {unknown}")


def derived_rng(seed: int, *tags: str) -> random.Random:
    """A private RNG per (seed, purpose): shuffling chat must not change when the code builder draws
    one more number. Seeded through sha256, so it is the same in every process (unlike hash())."""
    digest = hashlib.sha256(":".join([str(seed), *tags]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; valid domains are {', '.join(DOMAINS)}")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(SPLITS)}")
