"""Your own data as a new domain: a local .json/.jsonl/.csv/.parquet file or a Hugging Face dataset id.

    load_user_data("notes.jsonl", {"instruction": "question", "input": None, "response": "answer"})

`mapping` says which column holds each of instruction / input / response (input may be None: the
template then shows an empty input). Every mistake a user can make is reported as a UserDataError
that names the file, the row and the field, because a stack trace from deep inside pyarrow does
not tell anyone which line of their file is wrong.

A source that is not an existing file is treated as a hub id. Without network `datasets` retries
for ~20 s before failing; we check first (offline env flags, then a 2 s socket connect) and say so at once.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from .example import Example

# datasets' builder for each local file type
LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
FIELDS = ("instruction", "input", "response")
HUB_HOST, HUB_PORT = "huggingface.co", 443
NETWORK_TIMEOUT_S = 2.0  # long enough for a real connection, short enough not to feel like a hang


class UserDataError(ValueError):
    """A problem with user-supplied data: the message names the file, the row and the field."""


def _looks_like_path(source: str) -> bool:
    """./x, ../x, /x, ~/x, C:\\x, a/b/c or anything with a file extension is meant as a file.

    Hub ids are "name" or "owner/name" and have no extension ("v1.1" is a version, not an extension).
    """
    if source.startswith(("./", "../", "/", "~", ".\\", "\\")) or re.match(r"[A-Za-z]:[\\/]", source):
        return True
    if source.count("/") > 1 or "\\" in source:
        return True
    return re.search(r"\.[A-Za-z]\w{0,7}$", source) is not None


def _check_network(source: str) -> None:
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "").strip() not in ("", "0")]
    if offline:
        raise UserDataError(
            f"{source!r} is not a local file, so it would be downloaded from the Hugging Face hub, but "
            f"{' and '.join(offline)} is set: there is no network. Pass a local .json/.jsonl/.csv/.parquet file instead."
        )
    try:
        socket.create_connection((HUB_HOST, HUB_PORT), timeout=NETWORK_TIMEOUT_S).close()
    except OSError as e:
        raise UserDataError(
            f"{source!r} is not a local file, so it would be downloaded from the Hugging Face hub, but "
            f"{HUB_HOST}:{HUB_PORT} cannot be reached ({e}): there is no network. "
            f"Pass a local .json/.jsonl/.csv/.parquet file instead."
        ) from None


def _load_table(source: str, split: str):
    """The rows as a datasets.Dataset, or a UserDataError naming the file."""
    import datasets

    path = Path(source).expanduser()
    if path.is_file():
        loader = LOADERS.get(path.suffix.lower())
        if loader is None:
            raise UserDataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(LOADERS)}")
        if split != "train":
            raise UserDataError(f"{path}: a local file has a single split named 'train', not {split!r}")
        try:
            return datasets.load_dataset(loader, data_files=str(path), split="train")
        except Exception as e:  # datasets/arrow raise many types; all mean "could not parse this file"
            raise UserDataError(f"{path}: could not be parsed as {loader}: {type(e).__name__}: {e}") from e
    if path.exists():
        raise UserDataError(f"{path} is a folder; pass one .json/.jsonl/.csv/.parquet file")
    if _looks_like_path(source):
        raise UserDataError(f"file not found: {path}")
    _check_network(source)
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:
        raise UserDataError(f"could not load {source!r} (split {split!r}) from the Hugging Face hub: {type(e).__name__}: {e}") from e


def _cell(table_name: str, row: dict, index: int, field: str, column: str) -> str:
    value = row[column]
    if value is None:
        raise UserDataError(f"{table_name}: row {index}: field {field!r} (column {column!r}) is missing or null")
    if not isinstance(value, str):
        raise UserDataError(
            f"{table_name}: row {index}: field {field!r} (column {column!r}) must be a string, "
            f"got {type(value).__name__} {value!r}"
        )
    return value


def load_user_data(
    source: str,
    mapping: dict[str, str | None],
    domain: str = "custom",
    answer_field: str | None = None,
    split: str = "train",
) -> list[Example]:
    """Rows of `source` as Examples of `domain`. Rows are numbered from 1 in the order of the file
    (for a CSV, the header line is not a row)."""
    unknown = sorted(set(mapping) - set(FIELDS))
    if unknown or "instruction" not in mapping or "response" not in mapping:
        raise UserDataError(
            f"mapping must map 'instruction' and 'response' (and optionally 'input') to column names; got {mapping!r}"
        )
    table = _load_table(str(source), split)
    columns = list(table.column_names)
    wanted = {f: c for f, c in mapping.items() if c is not None}
    if answer_field is not None:
        wanted["answer"] = answer_field
    for field, column in wanted.items():
        if column not in columns:
            raise UserDataError(
                f"{source}: field {field!r} is mapped to column {column!r}, which does not exist; "
                f"the columns are {columns}"
            )
    examples = []
    for index, row in enumerate(table, start=1):
        text = {f: _cell(source, row, index, f, c) for f, c in wanted.items() if f in FIELDS}
        answer = None
        if answer_field is not None and row[answer_field] is not None:
            answer = str(row[answer_field])  # numbers are fine as answers: compared as text later
        examples.append(Example(domain, text["instruction"], text.get("input", ""), text["response"], answer, f"user:{source}"))
    return examples
