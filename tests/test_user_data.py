"""User data: each bad file names the file, the line and the fix; the offline flags are read as
`datasets` reads them; a hub id already in the local `datasets` cache loads without network.

No test here opens a socket: `no_socket` makes any connection attempt fail the test."""

import json
import socket
import time

import pytest

from ministacks.data import UserDataError, load_user_data
from ministacks.data import user

MAPPING = {"instruction": "q", "input": "ctx", "response": "a"}
OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@pytest.fixture
def no_socket(monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail(f"a test tried to open a network connection to {args[0] if args else kwargs}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)  # a name lookup comes before any connect


# --- malformed, empty and non-UTF-8 files ----------------------------------------------------------

def test_malformed_jsonl_names_line_and_parser_message(tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"q": "a", "ctx": "", "a": "b"}\n\n{"q": "c", "ctx": "", "a": }\n', encoding="utf-8")
    with pytest.raises(UserDataError, match=r"broken\.jsonl: line 3 could not be parsed as JSON: Expecting value \(column 28\)"):
        load_user_data(str(bad), MAPPING)
    bad.write_text('{"q": "a", "ctx": "", "a": "b"}\n["q", "ctx", "a"]\n', encoding="utf-8")
    with pytest.raises(UserDataError, match=r"broken\.jsonl: line 2: expected a JSON object.*got list"):
        load_user_data(str(bad), MAPPING)


def test_invalid_json_names_line_and_column(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('[{"q": "a", "ctx": "", "a": "b"},\n {"q": }]\n', encoding="utf-8")
    with pytest.raises(UserDataError, match=r"broken\.json: line 2 could not be parsed as JSON: Expecting value \(column 8\)"):
        load_user_data(str(bad), MAPPING)
    # a .json file may also be JSON Lines (datasets reads both): then the bad line is named
    bad.write_text('{"q": "a", "ctx": "", "a": "b"}\n{"q": "c", "ctx": "", "a": "d"\n', encoding="utf-8")
    with pytest.raises(UserDataError, match=r"broken\.json: line 2 could not be parsed as JSON: Expecting ','"):
        load_user_data(str(bad), MAPPING)


def test_valid_json_list_and_json_lines_in_a_json_file_load(tmp_path):
    rows = [{"q": "a", "ctx": "", "a": "b"}, {"q": "c", "ctx": "x", "a": "d"}]
    as_list, as_lines = tmp_path / "list.json", tmp_path / "lines.json"
    as_list.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    as_lines.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for path in (as_list, as_lines):
        assert [(e.instruction, e.input, e.response) for e in load_user_data(str(path), MAPPING)] == [
            ("a", "", "b"), ("c", "x", "d")]


@pytest.mark.parametrize("name, content", [
    ("zero.jsonl", b""), ("blank.jsonl", b"  \n\n\t\n"), ("zero.csv", b""), ("blank.csv", b"\n \n"),
    ("header.csv", b"q,ctx,a\n"), ("header-blank-lines.csv", b"q,ctx,a\n\n\n"), ("list.json", b"[]"),
])
def test_empty_file_is_named(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserDataError, match=rf"{name.replace('.', r'[.]')}: empty file"):
        load_user_data(str(tmp_path / name), MAPPING)


def test_empty_parquet_is_named(tmp_path):
    import datasets

    path = tmp_path / "none.parquet"
    datasets.Dataset.from_dict({"q": [], "ctx": [], "a": []}).to_parquet(str(path))
    with pytest.raises(UserDataError, match=r"none\.parquet: empty file"):
        load_user_data(str(path), MAPPING)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_latin1_file_names_byte_line_and_conversion(tmp_path, suffix):
    path = tmp_path / f"latin{suffix}"
    text = "q,ctx,a\nOrder?,y,one\nDrink?,x,café\n" if suffix == ".csv" else (
        '{"q": "Order?", "ctx": "", "a": "one"}\n{"q": "Drink?", "ctx": "", "a": "café"}\n')
    data = text.encode("latin-1")
    path.write_bytes(data)
    offset, line = data.index(b"\xe9"), text.count("\n") if suffix == ".csv" else 2
    with pytest.raises(UserDataError) as caught:
        load_user_data(str(path), MAPPING)
    message = str(caught.value)
    assert f"{path}: not UTF-8 text: byte {offset} (line {line}) is 0xe9" in message
    assert f"iconv -f latin1 -t utf-8 {path} >" in message and "encoding='latin-1'" in message
    # the advice works: the converted file loads
    converted = tmp_path / f"converted{suffix}"
    converted.write_text(path.read_text(encoding="latin-1"), encoding="utf-8")
    assert load_user_data(str(converted), MAPPING)[-1].response == "café"


# --- CSV cells are text ----------------------------------------------------------------------------

def test_csv_number_columns_are_text_as_written(tmp_path):
    path = tmp_path / "numbers.csv"
    path.write_text("q,ctx,a,gold\n7,x,3,4\n8,y,1.50,5\n", encoding="utf-8")
    examples = load_user_data(str(path), MAPPING, answer_field="gold")
    # ints stay "3" (not "3.0"), floats keep their digits, numeric instructions are text too
    assert [(e.instruction, e.input, e.response, e.answer) for e in examples] == [
        ("7", "x", "3", "4"), ("8", "y", "1.50", "5")]


def test_csv_empty_cell_is_still_a_missing_field(tmp_path):
    path = tmp_path / "gap.csv"
    path.write_text("q,ctx,a\n1,x,2\n3,y,\n", encoding="utf-8")
    with pytest.raises(UserDataError, match=r"gap\.csv: row 2: field 'response' \(column 'a'\) is missing or null"):
        load_user_data(str(path), MAPPING)


# --- offline flags, read as datasets reads them ----------------------------------------------------

@pytest.mark.parametrize("value, offline", [
    ("false", False), ("0", False), ("", False), ("no", False), ("off", False),
    ("1", True), ("true", True), ("ON", True), ("yes", True), ("True", True),
])
def test_datasets_offline_flag_values(monkeypatch, value, offline):
    for name in OFFLINE_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", value)
    assert (user.offline_flag() is not None) == offline
    # HF_DATASETS_OFFLINE, once set (even to ""), overrides HF_HUB_OFFLINE, as in datasets.config
    monkeypatch.setenv("HF_HUB_OFFLINE", "0" if offline else "1")
    assert (user.offline_flag() is not None) == offline


@pytest.mark.parametrize("hub, transformers, offline", [
    (None, None, False), ("false", None, False), ("0", "1", False), ("", "1", True), (None, "1", True),
    ("1", None, True), ("ON", "0", True), ("true", None, True),
])
def test_hub_offline_flag_when_datasets_flag_unset(monkeypatch, hub, transformers, offline):
    for name in OFFLINE_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in (("HF_HUB_OFFLINE", hub), ("TRANSFORMERS_OFFLINE", transformers)):
        if value is not None:
            monkeypatch.setenv(name, value)
    assert (user.offline_flag() is not None) == offline


def test_flag_parsing_matches_the_installed_libraries():
    # the same truthy set as the installed datasets and huggingface_hub, checked, not copied on faith
    from datasets import config
    from huggingface_hub import constants

    assert user.ENV_TRUE == config.ENV_VARS_TRUE_VALUES == constants.ENV_VARS_TRUE_VALUES


def test_datasets_offline_false_means_online(monkeypatch):
    # =false must not be mistaken for "set": we go on to the network check (here, a refused connect)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "false")
    attempts = []

    def unreachable(address, timeout):
        attempts.append(address)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(user.socket, "create_connection", unreachable)
    with pytest.raises(UserDataError, match="huggingface.co:443 cannot be reached.*no network"):
        load_user_data("owner/not-cached-anywhere", MAPPING)
    assert attempts == [(user.HUB_HOST, user.HUB_PORT)]


# --- a hub id already in the local datasets cache loads offline ------------------------------------

def fake_hub_cache(cache, repo_id, rows):
    """Write `rows` where datasets caches the hub dataset `repo_id`: <cache>/<owner>___<name>/<config>/
    <version>/<hash>/ holding dataset_info.json and the .arrow shard, as a real download leaves it."""
    from datasets.packaged_modules.json.json import Json

    owner, name = repo_id.split("/")
    source = cache / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    builder = Json(cache_dir=str(cache), data_files={"train": str(source)}, dataset_name=name, hash="0123abcd")
    builder.download_and_prepare()
    # a local build is filed under <name>/default-<data-files hash>/; a hub download under
    # <owner>___<name>/<config name>/, and the config folder must match dataset_info.json's config_name
    (cache / name).rename(cache / f"{owner}___{name}")
    for config_dir in (cache / f"{owner}___{name}").iterdir():
        if config_dir.is_dir():
            config_dir.rename(config_dir.with_name("default"))


def test_cached_hub_dataset_loads_offline(tmp_path, monkeypatch, no_socket):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    fake_hub_cache(tmp_path, "owner/tiny-notes", [{"q": "Hi?", "ctx": "", "a": "Hello."}, {"q": "Bye?", "ctx": "", "a": "Bye."}])
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # conftest sets it too; be explicit
    examples = load_user_data("owner/tiny-notes", MAPPING)
    assert [(e.instruction, e.response, e.source) for e in examples] == [
        ("Hi?", "Hello.", "user:owner/tiny-notes"), ("Bye?", "Bye.", "user:owner/tiny-notes")]


def test_cached_hub_dataset_loads_when_hub_unreachable(tmp_path, monkeypatch):
    # flags unset, socket check fails: the cache is still used, with the library forced offline
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    fake_hub_cache(tmp_path, "owner/tiny-notes", [{"q": "Hi?", "ctx": "", "a": "Hello."}])
    for name in OFFLINE_VARS:
        monkeypatch.delenv(name, raising=False)
    calls = []

    def connect_once(*args, **kwargs):  # our 2 s check is refused; any later attempt is datasets'
        calls.append(args)
        if len(calls) > 1:
            pytest.fail("datasets went to the network")
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", connect_once)  # user.socket is this same module
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail("datasets looked up a host"))
    # as if datasets had been imported online: only the forced offline mode keeps it off the network
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert [e.response for e in load_user_data("owner/tiny-notes", MAPPING)] == ["Hello."]
    assert datasets.config.HF_HUB_OFFLINE is False and constants.HF_HUB_OFFLINE is False  # undone after
    assert calls == [((user.HUB_HOST, user.HUB_PORT),)]


def test_uncached_hub_dataset_offline_fails_fast_naming_the_cache(tmp_path, monkeypatch, no_socket):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(UserDataError, match=r"HF_DATASETS_OFFLINE=1 is set: there is no network.*cache") as caught:
        load_user_data("owner/never-downloaded", MAPPING)
    assert time.perf_counter() - start < 2.0
    assert str(tmp_path) in str(caught.value)
