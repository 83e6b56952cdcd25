"""General prose: the Python reference manual's help topics, split by topic into train / val / test.

The paper asks whether stacks and routing keep the base's general ability with general benchmarks
beside the domain ones (docs/brainstacks.md §7, §9 Exp 3). The miniature's analogue is the loss on
real English text that is no domain's. The train topics join the general pretraining corpus
(general.py; always as raw text, and at most as much as an average domain's text); the val and test
topics are read by no corpus, so their loss is that of text the base has never seen.

Source: `pydoc_data.topics.topics`, the text `help("assert")` prints, which ships with every CPython
(79 topics, ~465K characters in 3.11; the Python version is in the cache key, splits.recipe).
© Python Software Foundation, under the PSF License Agreement (the licence of the Python
documentation, https://docs.python.org/3/license.html).

    topics ──► ranked by sha256(seed:topic) ──► test (10% of the text) | val (10%) | train (the rest)
           ──► paragraphs ("\\n\\n"), each kept once: in the first split, test → val → train, that has it
           ──► chunks: consecutive paragraphs of one topic packed up to max_example_chars

- Whole topics are assigned, never chunks, so no test chunk comes from a topic pretraining read.
  Topics still share text: "compound" repeats "if", "while", "for", "try" ... word for word. So a
  paragraph is kept only once (compared with whitespace collapsed), in the held-out split if any
  held-out topic has it: no training chunk repeats a paragraph of a val or test topic.
- Topics are taken in their hash order until a split holds its share of the characters, rather than
  by a threshold on each topic's hash: val and test are never empty, whatever the seed, and their
  size does not hang on which of the many one-paragraph topics the hash happens to pick.
- A paragraph longer than max_example_chars (grammar listings, long tables) is cut at line
  boundaries into pieces that fit. A single line longer than that would be dropped; the manual has
  none (its lines are wrapped at ~80 characters).
- Each split's chunks are shuffled (seeded), so the evaluation's first k chunks span several topics.

Building it takes milliseconds: it is computed on each call, not cached on disk.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

from .example import SPLITS, DataConfig, check_split, derived_rng

HELD_OUT_SHARE = 0.1  # of the manual's characters, for val and for test each: the usual 80 / 10 / 10


def _topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip it from a minimal Python
        raise ImportError(
            "the general prose set needs the standard library's pydoc_data module (the text help() prints), "
            "which this Python lacks; install the full standard library (e.g. Debian's libpython3-stdlib)"
        ) from e
    return topics


def _rank(seed: int, topic: str) -> bytes:
    return hashlib.sha256(f"{seed}:prose:{topic}".encode()).digest()


def _split_topics(seed: int) -> dict[str, list[str]]:
    topics = _topics()
    total = sum(map(len, topics.values()))
    out: dict[str, list[str]] = {"test": [], "val": [], "train": []}
    held = dict.fromkeys(SPLITS, 0)
    for topic in sorted(topics, key=lambda t: _rank(seed, t)):
        # the first split, test then val, still short of its share of the text takes the topic
        split = next((s for s in ("test", "val") if held[s] < HELD_OUT_SHARE * total), "train")
        held[split] += len(topics[topic])
        out[split].append(topic)
    return {split: sorted(out[split]) for split in SPLITS}


def prose_topics(cfg: DataConfig = DataConfig()) -> dict[str, list[str]]:
    """{split: topic names}. Topics in the order of a hash of the seed and their name go to test until
    it holds 10% of the manual's characters, then to val until it does, then to train. By characters,
    not by count: the topics run from 200 to 62,000 characters, and at seed 0 the first 8 of the 79
    topics hold 8,400 characters (11 chunks), too few for an interval on their loss."""
    return _split_topics(cfg.seed)


def pack(parts: list[str], sep: str, max_chars: int) -> list[str]:
    """Consecutive parts joined by `sep`, as many as fit in max_chars, then a new one (a part longer than
    max_chars on its own is its own piece: callers cut those first)."""
    out: list[str] = []
    for part in parts:
        if out and len(out[-1]) + len(sep) + len(part) <= max_chars:
            out[-1] += sep + part
        else:
            out.append(part)
    return out


def pieces(paragraph: str, max_chars: int) -> list[str]:
    """The paragraph itself if it fits, else its lines packed greedily into pieces of <= max_chars."""
    if len(paragraph) <= max_chars:
        return [paragraph]
    # no line of the manual is longer than max_chars; dropping one keeps every chunk in budget
    return pack([line for line in paragraph.split("\n") if len(line) <= max_chars], "\n", max_chars)


def chunks(paragraphs: list[str], max_chars: int) -> list[str]:
    """Consecutive paragraphs joined by a blank line, as many as fit in max_chars, then a new chunk."""
    return pack([p for paragraph in paragraphs for p in pieces(paragraph, max_chars)], "\n\n", max_chars)


@lru_cache(maxsize=8)
def _prose(seed: int, max_chars: int) -> dict[str, tuple[str, ...]]:
    topics, by_split = _topics(), _split_topics(seed)
    seen: set[str] = set()
    out = {}
    for split in ("test", "val", "train"):  # the held-out splits claim shared paragraphs first
        docs = []
        for topic in by_split[split]:
            kept = []
            for paragraph in topics[topic].split("\n\n"):
                key = " ".join(paragraph.split())
                if key and key not in seen:
                    seen.add(key)
                    kept.append(paragraph.strip("\n"))
            docs += chunks(kept, max_chars)
        derived_rng(seed, "prose", split).shuffle(docs)
        out[split] = tuple(docs)
    return {split: out[split] for split in SPLITS}


def general_text(cfg: DataConfig = DataConfig(), split: str = "test") -> list[str]:
    """The general prose documents of one split, each at most cfg.max_example_chars characters.

    "train" is what the general pretraining corpus reads from (general.prose_read: all of it unless the
    domains are smaller than the prose); "val" and "test" are in no corpus (the evaluation's general
    held-out text)."""
    check_split(split)
    return list(_prose(cfg.seed, cfg.max_example_chars)[split])
