"""Invariants of the general prose (ministacks.data.prose): whole topics per split, no paragraph shared
across splits, every chunk within the length budget, deterministic, never an empty held-out split.
(That the train chunks are in the general corpus and no val/test chunk is: tests/test_data.py.)"""

import dataclasses

import pytest

from ministacks.data import SPLITS, DataConfig, general_text, prose_topics
from ministacks.data import prose

CFG = DataConfig()


def split_text(cfg):
    return {split: general_text(cfg, split) for split in SPLITS}


def pieces_of(docs):
    """A chunk's paragraphs (or line-cut pieces of a long one), whitespace collapsed."""
    return [" ".join(p.split()) for doc in docs for p in doc.split("\n\n")]


def test_topics_are_split_whole_and_every_split_is_non_empty():
    for seed in range(5):
        by_split = prose_topics(dataclasses.replace(CFG, seed=seed))
        assert all(by_split[s] for s in SPLITS), seed
        names = [t for s in SPLITS for t in by_split[s]]
        assert len(names) == len(set(names)) == len(prose._topics())  # each topic in exactly one split
        text = {s: sum(len(prose._topics()[t]) for t in by_split[s]) for s in SPLITS}
        total = sum(text.values())
        assert text["train"] > 0.6 * total and min(text["val"], text["test"]) >= 0.1 * total  # roughly 80 / 10 / 10


def test_every_chunk_comes_from_its_own_splits_topics():
    topics, by_split = prose._topics(), prose_topics(CFG)
    for split, docs in split_text(CFG).items():
        assert docs and all(doc.strip() for doc in docs)
        own = "\x00".join(topics[t] for t in by_split[split])
        for doc in docs:
            for piece in doc.split("\n\n"):
                assert piece in own, f"a {split} chunk holds text of no {split} topic"


def test_no_paragraph_is_in_two_splits():
    pieces = {split: set(pieces_of(docs)) for split, docs in split_text(CFG).items()}
    assert not pieces["train"] & pieces["val"]
    assert not pieces["train"] & pieces["test"]
    assert not pieces["val"] & pieces["test"]
    # the reason the rule exists: "compound" repeats "if", "while", "for" ... verbatim
    topics = prose._topics()
    assert topics["if"].split("\n\n")[3] in topics["compound"]


@pytest.mark.parametrize("max_chars", [CFG.max_example_chars, 300])
def test_chunks_fit_the_budget_and_keep_the_text(max_chars):
    cfg = dataclasses.replace(CFG, max_example_chars=max_chars)
    docs = [d for ds in split_text(cfg).values() for d in ds]
    assert max(map(len, docs)) <= max_chars
    # packed up to the budget, not one paragraph a chunk
    assert sum(map(len, docs)) / len(docs) > 0.5 * max_chars
    # cutting long paragraphs at lines loses nothing (the manual has no line over 300 characters):
    # the same non-space characters as the uncut text of the default budget
    def letters(ds):
        return sum(len("".join(d.split())) for d in ds)

    assert letters(docs) == letters(d for ds in split_text(CFG).values() for d in ds)


def test_long_paragraphs_are_cut_at_lines():
    paragraph = "\n".join(f"line {i:03d} " + "x" * 40 for i in range(30))
    parts = prose.pieces(paragraph, 200)
    assert len(parts) > 1 and all(len(p) <= 200 for p in parts)
    assert "\n".join(parts) == paragraph  # cut between lines, nothing lost
    assert prose.chunks(["a" * 50, "b" * 50, "c" * 100], 120) == ["a" * 50 + "\n\n" + "b" * 50, "c" * 100]
    assert prose.pieces("short\n" + "y" * 300, 200) == ["short"]  # a line over the budget is dropped


def test_deterministic_and_seeded():
    first = split_text(CFG)
    prose._prose.cache_clear()
    assert split_text(CFG) == first
    assert general_text(CFG) == first["test"]  # the evaluation's default split
    assert split_text(dataclasses.replace(CFG, seed=1))["test"] != first["test"]
    assert first["test"] != sorted(first["test"])  # shuffled: the first k chunks span several topics
    with pytest.raises(ValueError, match="valid splits are train, val, test"):
        general_text(CFG, "dev")
