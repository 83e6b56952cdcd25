"""Your own data as a new domain: a local .json/.jsonl/.csv/.parquet file or a Hugging Face dataset id.

    load_user_data("notes.jsonl", {"instruction": "question", "input": None, "response": "answer"})

`mapping` says which column holds each of instruction / input / response (input may be None: the
template then shows an empty input). Every mistake a user can make is reported as a UserDataError
that names the file, the row and the field, because a stack trace from deep inside pyarrow does
not tell anyone which line of their file is wrong. So text files are checked here before `datasets`
sees them: UTF-8, not empty, and (for JSON) every line parses — each failure names the line.

A CSV has no types, so every CSV column is read as text: a column of numbers ("3", "4.5") is a valid
response exactly as written, where pyarrow would have guessed int or float.

A source that is not an existing file is treated as a hub id. Without network `datasets` retries
for ~20 s before failing; we check first (offline env flags, then a 2 s socket connect) and, with no
network, load the id from the local `datasets` cache if it was downloaded before, else say so at once.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
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
# the values datasets.config and huggingface_hub.constants count as "on" (ENV_VARS_TRUE_VALUES)
ENV_TRUE = {"1", "ON", "YES", "TRUE"}


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


# --- local files: checked here so that errors name the line ---------------------------------------

def _read_text(path: Path) -> str:
    """The file as text, or a UserDataError at the first byte that is not UTF-8 (with the fix)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        out = path.with_name(f"{path.stem}-utf8{path.suffix}")
        raise UserDataError(
            f"{path}: not UTF-8 text: byte {e.start} (line {line}) is 0x{data[e.start]:02x} ({e.reason}). "
            f"The file is probably latin-1 / Windows-1252; convert it to UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {path} > {out}`, or in Python "
            f"Path({str(out)!r}).write_text(Path({str(path)!r}).read_text(encoding='latin-1'), encoding='utf-8')"
        ) from None
    if not text.strip():
        raise UserDataError(f"{path}: empty file (no rows); put one example per row in it")
    return text


def _check_json_lines(path: Path, text: str) -> None:
    """Each non-blank line must be one JSON object: name the first line that is not."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserDataError(
                f"{path}: line {number} could not be parsed as JSON: {e.msg} (column {e.colno}); "
                f"each line of a JSON Lines file must be one complete JSON object"
            ) from None
        if not isinstance(value, dict):
            raise UserDataError(
                f"{path}: line {number}: expected a JSON object {{\"column\": value, ...}}, got {type(value).__name__}"
            )


def _check_json(path: Path, text: str) -> None:
    """A .json file is either one JSON document (a list of objects) or JSON Lines, as datasets reads it."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        first = next(line for line in text.splitlines() if line.strip())
        try:
            json.loads(first)  # the first line stands alone: the file is JSON Lines
        except json.JSONDecodeError:
            raise UserDataError(
                f"{path}: line {e.lineno} could not be parsed as JSON: {e.msg} (column {e.colno})"
            ) from None
        return _check_json_lines(path, text)
    if document == [] or document == {}:
        raise UserDataError(f"{path}: empty file (the JSON holds no rows); put one object per example in it")


def _check_csv(path: Path, text: str) -> list[str]:
    """The header (the column names) of a CSV that has at least one row below it."""
    rows = [row for row in csv.reader(io.StringIO(text)) if row]
    if len(rows) < 2:
        raise UserDataError(f"{path}: empty file (a header line {rows[0]} and no rows below it)")
    return rows[0]


def _parquet_rows(path: Path) -> int | None:
    """Rows in a parquet file's footer, or None when it is not readable parquet (datasets then says why)."""
    import pyarrow.parquet

    try:
        return pyarrow.parquet.ParquetFile(path).metadata.num_rows
    except Exception:
        return None


def _load_file(path: Path, split: str):
    import datasets

    loader = LOADERS.get(path.suffix.lower())
    if loader is None:
        raise UserDataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(LOADERS)}")
    if split != "train":
        raise UserDataError(f"{path}: a local file has a single split named 'train', not {split!r}")
    options = {}
    if path.suffix.lower() in (".json", ".jsonl"):
        text = _read_text(path)
        (_check_json if path.suffix.lower() == ".json" else _check_json_lines)(path, text)
    elif loader == "csv":
        header = _check_csv(path, _read_text(path))
        # a CSV has no types: read every column as text, so "3" stays "3" (not 3, and not "3.0")
        options["features"] = datasets.Features({name: datasets.Value("string") for name in header})
    elif _parquet_rows(path) == 0:
        raise UserDataError(f"{path}: empty file (a parquet table with no rows)")
    try:
        table = datasets.load_dataset(loader, data_files=str(path), split="train", **options)
    except Exception as e:  # datasets/arrow raise many types; all mean "could not parse this file"
        raise UserDataError(f"{path}: could not be parsed as {loader}: {type(e).__name__}: {e}") from e
    if len(table) == 0:
        raise UserDataError(f"{path}: empty file (no rows); put one example per row in it")
    return table


# --- hub ids: fail fast without network, but use the local cache ----------------------------------

def offline_flag() -> str | None:
    """'NAME=value' of the variable that puts `datasets` offline, or None when it is online.

    Read exactly as datasets 5.x config.py does: HF_DATASETS_OFFLINE, when set at all (even to ""),
    decides; otherwise huggingface_hub's `HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE` (first non-empty)
    does. Only 1/ON/YES/TRUE (any case) mean offline, so HF_DATASETS_OFFLINE=false means online.
    """
    names = ["HF_DATASETS_OFFLINE"] if "HF_DATASETS_OFFLINE" in os.environ else ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"]
    name = next((n for n in names if os.environ.get(n)), None)
    if name is None or os.environ[name].upper() not in ENV_TRUE:
        return None
    return f"{name}={os.environ[name]}"


def _no_network_reason() -> str | None:
    """Why the hub cannot be used now, or None when it can."""
    flag = offline_flag()
    if flag is not None:
        return f"{flag} is set"
    try:
        socket.create_connection((HUB_HOST, HUB_PORT), timeout=NETWORK_TIMEOUT_S).close()
    except OSError as e:
        return f"{HUB_HOST}:{HUB_PORT} cannot be reached ({e})"
    return None


@contextlib.contextmanager
def _cache_only():
    """datasets and huggingface_hub read the offline flags once, at import; force them on for one call,
    so a dataset missing from the cache fails at once instead of after ~20 s of retries."""
    import datasets
    from huggingface_hub import constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE = saved


def _load_hub(source: str, split: str, config: str | None = None, streaming: bool = False):
    import datasets

    reason = _no_network_reason()
    if reason is None:
        try:
            return datasets.load_dataset(source, config, split=split, streaming=streaming)
        except Exception as e:
            raise UserDataError(
                f"could not load {source!r} (split {split!r}) from the Hugging Face hub: {type(e).__name__}: {e}"
            ) from e
    try:  # no network, but it may have been downloaded before
        with _cache_only():
            return datasets.load_dataset(source, config, split=split, streaming=streaming)
    except Exception as e:
        cause = str(e).splitlines()[0] if str(e) else ""
        raise UserDataError(
            f"{source!r} is not a local file, so it would be downloaded from the Hugging Face hub, but "
            f"{reason}: there is no network, and the local datasets cache ({datasets.config.HF_DATASETS_CACHE}) "
            f"cannot serve it ({type(e).__name__}: {cause}). Pass a local .json/.jsonl/.csv/.parquet file instead, "
            f"or load {source!r} once where the hub is reachable."
        ) from None


def _load_table(source: str, split: str):
    """The rows as a datasets.Dataset, or a UserDataError naming the file."""
    path = Path(source).expanduser()
    if path.is_file():
        return _load_file(path, split)
    if path.exists():
        raise UserDataError(f"{path} is a folder; pass one .json/.jsonl/.csv/.parquet file")
    if _looks_like_path(source):
        raise UserDataError(f"file not found: {path}")
    return _load_hub(source, split)


# --- rows -> Examples -----------------------------------------------------------------------------

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
