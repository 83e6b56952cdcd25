"""Chat domain: the English conversations of chatterbot-corpus (BSD), as utterance → reply pairs.

Each yml file holds `conversations: [[turn1, turn2, ...], ...]`. Every consecutive pair of turns is
one example: instruction = the utterance, response = the reply. From the second pair on, the turn
before the utterance goes into `input`, so a reply that only makes sense in context ("Why?" →
"Because ...") still has that context in the prompt. 2,026 conversations give ~2,360 pairs, but
tech_support.yml asks the same ten questions ~100 times each, so only ~1,080 distinct prompts
survive deduplication: chat is the smallest domain (~680 train examples at the default config).
"""

from __future__ import annotations

import importlib.resources

import yaml

from .example import DataConfig, Example

PACKAGE = "chatterbot_corpus"
LANGUAGE = "english"


def _turn_text(value) -> str | None:
    """yaml turns a bare `yes` or `42` into a bool or an int; keep numbers as their text, drop the rest."""
    if isinstance(value, bool) or value is None:
        return None  # the author's original word ("yes"/"on"/"y") cannot be recovered
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def build(cfg: DataConfig) -> list[Example]:
    """All utterance → reply pairs in file order (sorted file names, so the order is stable)."""
    folder = importlib.resources.files(PACKAGE) / "data" / LANGUAGE
    examples = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if not path.name.endswith(".yml"):
            continue
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        source = f"chatterbot-corpus:{LANGUAGE}/{path.name}"
        for conversation in doc.get("conversations") or []:
            turns = [_turn_text(t) for t in conversation]
            for i in range(len(turns) - 1):
                utterance, reply = turns[i], turns[i + 1]
                if utterance is None or reply is None:
                    continue
                context = turns[i - 1] if i > 0 and turns[i - 1] is not None else ""
                examples.append(Example("chat", utterance, context, reply, None, source))
    return examples
