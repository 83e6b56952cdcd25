"""The general (pretraining) corpus and `build_all`, which builds every cached corpus at once.

ministacks pretrains its own small base model, and a base model must not have seen the questions it
is later evaluated on. So the general corpus is made of the *train* examples of every domain only,
and the *train* documents of the general prose (prose.py: the Python reference manual's help topics).
A train example whose normalised prompt is a val/test prompt of *any* domain is left out too, so
even a cross-domain coincidence cannot leak an evaluation question into pretraining.

The prose weighs at most as much as one domain: its train documents are read, in their shuffled
order, while their characters stay within the average domain's train text (`prose_read`). At `quick`
and above that is all of them (255K characters beside ~740K per domain); at `smoke` size the manual
would otherwise be 61% of the corpus, and the base a model of the Python manual rather than of the
five domains.

The cached corpus is raw text, without the Alpaca template: the tokenizer is trained on it. The
paper's bases are instruction-tuned and know the template before any stack; a base pretrained on
raw text alone does not, and each domain's first stack then spends itself learning the template.
`general_corpus(..., template_share=s)` gives a share s of the same documents in the Alpaca template
instead (each example's choice is a hash of the seed and its prompt: stable, independent of order),
which is what pretraining reads (PretrainConfig.template_share). The prose is always raw text: it has
no instruction and response to put in the template.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from ..io import atomic_write_json, read_json

from .example import DOMAINS, DataConfig, Example, derived_rng
from .prose import general_text
from .splits import domain_stats, ensure_domain, load_domain_splits, read_jsonl, recipe_dir, write_jsonl


def raw_text(example: Example) -> str:
    """An example as a plain document: its parts in natural reading order, one per line.

    Chat puts the previous turn (its `input`) first, because that is the order it was said in.
    """
    parts = (example.input, example.instruction, example.response) if example.domain == "chat" else (
        example.instruction, example.input, example.response)
    return "\n".join(p for p in parts if p)


def _general_examples(cfg: DataConfig, cache: Path | None) -> list[Example]:
    """Every domain's train examples whose prompt no val/test example of any domain shares."""
    splits = {domain: load_domain_splits(domain, cfg, cache) for domain in DOMAINS}
    held_out = {ex.key() for by_split in splits.values() for s in ("val", "test") for ex in by_split[s]}
    return [ex for by_split in splits.values() for ex in by_split["train"] if ex.key() not in held_out]


def _templated(cfg: DataConfig, ex: Example, share: float) -> bool:
    """Is `ex` one of the `share` of documents given in the Alpaca template? A hash, not an RNG draw."""
    digest = hashlib.sha256(f"{cfg.seed}:template:{ex.domain}:{ex.key()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def prose_read(cfg: DataConfig, examples: list[Example]) -> list[str]:
    """The train prose the general corpus holds: general_text's train documents in order, while their
    characters total no more than the average domain's share of `examples` (as raw text)."""
    budget = sum(len(raw_text(ex)) for ex in examples) / len(DOMAINS)
    read, chars = [], 0
    for doc in general_text(cfg, "train"):
        if chars + len(doc) > budget:
            break
        read.append(doc)
        chars += len(doc)
    return read


def _general_documents(cfg: DataConfig, examples: list[Example], template_share: float) -> list[str]:
    """The train examples (a `template_share` of them templated) and the train prose, shuffled together."""
    items: list[Example | str] = [*examples, *prose_read(cfg, examples)]
    # shuffled so that a pretraining run cut short still sees every domain; the order does not depend
    # on template_share, so a document's place is the same whichever form it is given in
    derived_rng(cfg.seed, "general").shuffle(items)

    def document(item: Example | str) -> str:
        if isinstance(item, str):
            return item  # prose: raw text always
        return item.text() if _templated(cfg, item, template_share) else raw_text(item)

    return [document(item) for item in items]


def _build_general(cfg: DataConfig, cache: Path | None) -> None:
    examples = _general_examples(cfg, cache)
    docs, prose = _general_documents(cfg, examples, 0.0), prose_read(cfg, examples)
    folder = recipe_dir(cfg, cache)
    write_jsonl(folder / "general.jsonl", [{"text": d} for d in docs])
    atomic_write_json(folder / "general.json", {"docs": len(docs), "chars": sum(map(len, docs)),  # written last
                                                "prose_docs": len(prose), "prose_chars": sum(map(len, prose))})


def general_corpus(cfg: DataConfig = DataConfig(), cache: Path | None = None,
                   template_share: float = 0.0) -> list[str]:
    """Pretraining documents from the train splits of all domains and the train prose, shuffled: raw text
    (cached), or with a `template_share` of the examples in the Alpaca template, full example with its
    response (Example.text)."""
    if not 0.0 <= template_share <= 1.0:
        raise ValueError(f"template_share must be in [0, 1], got {template_share}")
    if template_share > 0:
        return _general_documents(cfg, _general_examples(cfg, cache), template_share)
    folder = recipe_dir(cfg, cache)
    if not (folder / "general.json").exists():
        _build_general(cfg, cache)
    return [row["text"] for row in read_jsonl(folder / "general.jsonl")]


def build_all(cfg: DataConfig = DataConfig(), cache: Path | None = None, progress: bool = True) -> dict:
    """Build (or find cached) all five domains and the general corpus; return their sizes.

    {domain: {"train": n, "val": n, "test": n, "chars": n, ...},
     "general": {"docs": n, "chars": n, "prose_docs": n, "prose_chars": n}, "cache": str}
    `chars` counts the rendered text() of every example of the domain, all splits; the general corpus's
    docs and chars include its prose_docs and prose_chars.
    """
    from tqdm.auto import tqdm

    stats: dict = {}
    bar = tqdm(list(DOMAINS) + ["general"], desc="data", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        start = time.perf_counter()
        if name == "general":
            general_corpus(cfg, cache)
            stats["general"] = read_json(recipe_dir(cfg, cache) / "general.json")
        else:
            ensure_domain(name, cfg, cache)
            stats[name] = domain_stats(name, cfg, cache)
        stats[name]["seconds"] = round(time.perf_counter() - start, 2)  # ~0 on a cache hit
    stats["cache"] = str(recipe_dir(cfg, cache))
    return stats
