"""The paper's data sets, by Hugging Face hub id, as a domain's candidates (docs/brainstacks.md §9).

`DataConfig(hub="tinyllama")` (or "gemma") builds each domain from the sets the paper trained that base on,
instead of the embedded corpora; everything after the candidates is the same recipe (splits.py: the length
rules, the deduplication, the seeded split), cached under its own recipe hash. Each row is mapped to the
Alpaca fields as the paper did: the first turn only (the first user message is the instruction, the first
reply after it the response), and responses cut at `max_response_chars` (splits.fit_length; 2000, the paper's).

    TinyLlama (Exp 1, Exp 2)  chat tatsu-lab/alpaca; code iamtarun/python_code_instructions_18k_alpaca;
                              medical medalpaca/medical_meadow_medical_flashcards; math openai/gsm8k
    Gemma 3 (Exp 3)           the paper's lists per domain (GEMMA below), mixed

A math row keeps its checkable answer: the number after "####" (GSM8K's own form), or a final \\boxed{}.
Loading goes through `datasets`; without a network a set is read from the local datasets cache if it was
downloaded before, and otherwise `hub_unavailable` says why, before any work, so a script can fall back to
the embedded corpora and say so. The column layouts are those of the sets' dataset cards.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .example import Example

FIRST_USER = ("user", "human")
FIRST_REPLY = ("assistant", "gpt")


@dataclass(frozen=True)
class HubSet:
    id: str
    config: str | None
    split: str
    fields: Callable[[dict], tuple[str, str, str] | None]  # row -> (instruction, input, response), None to skip
    limit: int | None = None  # rows read at most (the large reasoning sets)


def alpaca(row: dict) -> tuple[str, str, str]:
    return row["instruction"], row.get("input") or "", row["output"]


def first_turn(row: dict) -> tuple[str, str, str] | None:
    """The first user message and the first reply after it, from `messages` ({role, content}) or
    `conversations` ({from, value}); None for a row that has no such pair."""
    turns = row.get("messages") or row.get("conversations") or []
    pairs = [(t.get("role", t.get("from")), t.get("content", t.get("value"))) for t in turns]
    for i, (who, text) in enumerate(pairs):
        if who in FIRST_USER:
            reply = next((t for w, t in pairs[i + 1:] if w in FIRST_REPLY), None)
            return (text, "", reply) if text and reply else None
    return None


def columns(instruction: str, response: str, input: str | None = None) -> Callable[[dict], tuple[str, str, str] | None]:
    def fields(row: dict) -> tuple[str, str, str] | None:
        ins, res = row.get(instruction), row.get(response)
        if not isinstance(ins, str) or not isinstance(res, str):
            return None
        return ins, (row.get(input) or "") if input else "", res
    return fields


def medqa(row: dict) -> tuple[str, str, str] | None:
    options = row.get("options") or {}
    listed = "\n".join(f"{k}. {v}" for k, v in sorted(options.items()))
    return row["question"], listed, f"{row['answer_idx']}. {row['answer']}"


def pubmedqa(row: dict) -> tuple[str, str, str] | None:
    context = " ".join((row.get("context") or {}).get("contexts", []))
    return row["question"], context, f"{row['long_answer']} Answer: {row['final_decision']}"


def o1_medical(row: dict) -> tuple[str, str, str] | None:
    return row["Question"], "", f"<think>{row['Complex_CoT']}</think>\n{row['Response']}"


TINYLLAMA: dict[str, list[HubSet]] = {
    "chat": [HubSet("tatsu-lab/alpaca", None, "train", alpaca)],
    "code": [HubSet("iamtarun/python_code_instructions_18k_alpaca", None, "train", alpaca)],
    "medical": [HubSet("medalpaca/medical_meadow_medical_flashcards", None, "train", alpaca)],
    "math": [HubSet("openai/gsm8k", "main", "train", columns("question", "answer"))],
}
LARGE = 20000  # rows read from each of the large sets (a domain keeps DataConfig.max_examples of all of them)
GEMMA: dict[str, list[HubSet]] = {
    "chat": [HubSet("nvidia/Nemotron-Post-Training-Dataset-v2", None, "chat", first_turn, LARGE),
             HubSet("HuggingFaceH4/ultrafeedback_binarized", None, "train_sft", first_turn, LARGE),
             HubSet("nvidia/Daring-Anteater", None, "train", first_turn, LARGE)],
    "code": [HubSet("iamtarun/python_code_instructions_18k_alpaca", None, "train", alpaca),
             HubSet("nvidia/Nemotron-Post-Training-Dataset-v2", None, "code", first_turn, LARGE),
             HubSet("nvidia/OpenCodeReasoning", "split_0", "split_0", columns("input", "output"), LARGE),
             HubSet("open-thoughts/OpenThoughts-114k", None, "train", first_turn, LARGE)],
    "math": [HubSet("openai/gsm8k", "main", "train", columns("question", "answer")),
             HubSet("nvidia/OpenMathReasoning", None, "cot", columns("problem", "generated_solution"), LARGE),
             HubSet("AI-MO/NuminaMath-CoT", None, "train", columns("problem", "solution"), LARGE),
             HubSet("nvidia/Nemotron-Post-Training-Dataset-v2", None, "math", first_turn, LARGE)],
    "medical": [HubSet("GBaker/MedQA-USMLE-4-options", None, "train", medqa),
                HubSet("FreedomIntelligence/medical-o1-reasoning-SFT", "en_mix", "train", o1_medical, LARGE),
                HubSet("qiaojin/PubMedQA", "pqa_labeled", "train", pubmedqa)],
    "reasoning": [HubSet("open-thoughts/OpenThoughts-114k", None, "train", first_turn, LARGE),
                  HubSet("nvidia/Nemotron-Post-Training-Dataset-v2", None, "stem", first_turn, LARGE),
                  HubSet("NovaSky-AI/Sky-T1_data_17k", None, "train", first_turn, LARGE),
                  HubSet("nvidia/OpenMathReasoning", None, "tool_integrated", columns("problem", "generated_solution"),
                         LARGE)],
}
FAMILIES: dict[str, dict[str, list[HubSet]]] = {"tinyllama": TINYLLAMA, "gemma": GEMMA}


def math_answer(response: str) -> str | None:
    """The checkable number of a math response: after GSM8K's "####", else a final \\boxed{...}."""
    if "####" in response:
        return response.rsplit("####", 1)[1].strip().replace(",", "") or None
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", response)
    return boxed[-1].strip() if boxed else None


def sets_of(family: str, domains) -> list[HubSet]:
    if family not in FAMILIES:
        raise ValueError(f"unknown hub data {family!r}; choose one of {', '.join(FAMILIES)}")
    missing = [d for d in domains if d not in FAMILIES[family]]
    if missing:
        raise ValueError(f"the paper's {family} data has no set for {', '.join(missing)}")
    return [s for d in domains for s in FAMILIES[family][d]]


def _rows(s: HubSet):
    """The rows of one set: from the hub, or from the local datasets cache without a network (user.py's loader,
    which says clearly when neither can serve it)."""
    from .user import _load_hub

    rows = _load_hub(s.id, s.split, s.config, streaming=s.limit is not None)
    return rows.take(s.limit) if s.limit is not None else rows


def hub_unavailable(family: str, domains) -> str | None:
    """Why the paper's sets for `domains` cannot be had here, or None when they can (before any download)."""
    import datasets

    from .user import _cache_only, _no_network_reason

    sets = sets_of(family, domains)
    reason = _no_network_reason()
    if reason is None:
        return None
    try:  # no network: they can still be had if every one was downloaded before
        with _cache_only():
            for s in sets:
                datasets.load_dataset_builder(s.id, s.config)
        return None
    except Exception:
        return reason


def build(domain: str, family: str, cfg) -> list[Example]:
    """The candidates of `domain` from the paper's `family` of sets, mapped to the template (module docstring)."""
    examples = []
    for s in sets_of(family, [domain]):
        for row in _rows(s):
            fields = s.fields(dict(row))
            if fields is None:
                continue
            instruction, input, response = (t.strip() for t in fields)
            if not instruction or not response:
                continue
            answer = math_answer(response) if domain == "math" else None
            examples.append(Example(domain, instruction, input, response, answer, f"hub:{s.id}"))
    return examples
