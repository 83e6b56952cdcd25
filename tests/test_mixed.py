"""Invariants of the meta-router's mixed-domain prompts: built from real items of one split, multi-hot
labels in DOMAINS order, deterministic, seeded numbers, bounded lengths, and no hang when a split runs out."""

import ast
import json
import re
import threading
from collections import Counter

import pytest

from ministacks.data import (
    DOMAINS,
    MIXED_KINDS,
    DataConfig,
    Example,
    MixedPrompt,
    load_split,
    mixed_prompts,
    raw_prompt,
)
from ministacks.data.mixed import MAX_PROMPT_CHARS

SMOKE = DataConfig(max_examples=150, n_val=20, n_test=20)
SOURCE_DOMAINS = ("chat", "code", "math", "medical")  # the corpora mixed prompts draw from
ALL = 10**6  # more than any split holds: "as many as possible"
# the medical builder's three instruction forms, written out here so the check does not reuse its code
MEDICAL_TERM = re.compile(r"^(?:Define the clinical finding: |What are the clinical features of |What is the ICD-10-CM code for: )(.+?)\??$")


@pytest.fixture(scope="module")
def corpora():
    return {split: {d: load_split(d, split, SMOKE) for d in SOURCE_DOMAINS} for split in ("train", "val")}


@pytest.fixture(scope="module")
def by_key(corpora):
    return {split: {ex.key(): ex for exs in domains.values() for ex in exs} for split, domains in corpora.items()}


def within(seconds: float, fn, *args):
    """fn(*args), failing the test (instead of hanging it) if it has not returned after `seconds`."""
    out = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 -- re-raised below, in the test's own thread
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn.__name__}{args} still running after {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.fixture(scope="module")
def mixed(corpora):  # corpora first, so the time limit covers generation, not building the splits
    # ALL prompts per kind is far more than the smoke splits hold: this must stop when they run out
    return {split: within(30, mixed_prompts, SMOKE, split, ALL) for split in ("train", "val")}


def test_raw_prompt_is_instruction_then_input():
    assert raw_prompt(Example("code", "Write f.", "Doc.", "def f(): ...", None, "t")) == "Write f.\n\nDoc."
    assert raw_prompt(Example("math", "What is 2 + 2?", "", "4", "4", "t")) == "What is 2 + 2?"


def test_kinds_and_multi_hot_labels(mixed):
    label_sets = list(MIXED_KINDS.values())
    assert len(set(label_sets)) == len(label_sets) >= 4
    for labels in label_sets:
        assert len(labels) >= 2 and list(labels) == [d for d in DOMAINS if d in labels]
    for split, prompts in mixed.items():
        assert set(Counter(p.kind for p in prompts)) == set(MIXED_KINDS), split
        assert all(p.labels == MIXED_KINDS[p.kind] for p in prompts)
        assert all("### Instruction" not in p.text for p in prompts)  # raw prompts, no template


def test_deterministic_and_n_per_kind_respected(mixed):
    again = mixed_prompts(SMOKE, "val", 3)
    assert again == mixed_prompts(SMOKE, "val", 3)
    assert Counter(p.kind for p in again) == {kind: 3 for kind in MIXED_KINDS}
    assert mixed_prompts(SMOKE, "val", ALL) == mixed["val"]
    assert mixed_prompts(SMOKE, "val", 0) == []
    p = again[0]
    assert MixedPrompt.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_sources_are_real_items_of_their_split(mixed, by_key):
    for split, prompts in mixed.items():
        used = [key for p in prompts for key in p.sources]
        assert len(used) == len(set(used)), f"a {split} corpus item went into two mixed prompts"
        assert set(used) <= set(by_key[split]), f"a source of a {split} prompt is not a {split} corpus item"
    train_sources = {key for p in mixed["train"] for key in p.sources}
    assert not train_sources & {key for p in mixed["val"] for key in p.sources}


def test_prompts_quote_their_sources(mixed, by_key):
    openers = 0
    for split, prompts in mixed.items():
        for p in prompts:
            items = {by_key[split][key].domain: by_key[split][key] for key in p.sources}
            assert set(items) <= set(p.labels)
            if p.kind in ("medical+math", "chat+medical"):
                term = MEDICAL_TERM.match(items["medical"].instruction).group(1)
                assert term in p.text, (term, p.text)
            if p.kind == "code+math":
                assert raw_prompt(items["math"]) in p.text
            if p.kind == "reasoning+code":
                signature = re.search(r"`([^`]+)`", items["code"].instruction).group(1)
                function = ast.parse(items["code"].response).body[0].name
                assert f"`{signature}`" in p.text or f"def {function}(" in p.text
            if "chat" in items:
                openers += 1
                assert p.text.startswith(items["chat"].instruction)
    assert openers > 0  # the smoke train split holds a few greetings


def test_dose_numbers_follow_the_seed(mixed, by_key):
    def numbers(prompts):  # source -> the numbers in the question once the (real) medical term is removed
        found = {}
        for p in (p for p in prompts if p.kind == "medical+math"):
            term = MEDICAL_TERM.match(by_key["train"][p.sources[0]].instruction).group(1)
            found[p.sources[0]] = re.findall(r"\d+", p.text.replace(term, ""))
        return found

    seed0, seed1 = numbers(mixed["train"]), numbers(mixed_prompts(SMOKE, "train", ALL, seed=1))
    assert all(len(n) >= 2 for n in seed0.values())  # a weight and a dose at least
    # drawn, not fixed per template: the first number (a weight) takes many values across prompts
    assert len({n[0] for n in seed0.values()}) >= len(seed0) // 3 >= 5
    common = set(seed0) & set(seed1)
    assert len(common) >= 5
    assert sum(seed0[k] == seed1[k] for k in common) <= len(common) // 4


def test_lengths_are_bounded_and_code_still_parses(mixed):
    for prompts in mixed.values():
        for p in prompts:
            assert 0 < len(p.text) <= MAX_PROMPT_CHARS, p.text
            for code in re.findall(r"```python\n(.*?)\n```", p.text, flags=re.DOTALL):
                ast.parse(code)  # a cut function keeps whole statements


def test_a_split_that_runs_out_returns_what_it_has(mixed, corpora):
    counts = Counter(p.kind for p in mixed["val"])
    val = corpora["val"]
    # each corpus item feeds one prompt, so the corpora bound the counts; the request (ALL) does not
    assert counts["medical+math"] + counts["chat+medical"] <= len(val["medical"])
    assert counts["code+math"] <= len(val["math"]) and counts["reasoning+code"] <= len(val["code"])
    assert sum(counts.values()) < 4 * len(val["medical"])
