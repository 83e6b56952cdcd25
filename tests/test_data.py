"""Invariants of ministacks.data: answer conventions, disjoint deterministic splits, a general corpus
free of evaluation questions, a cache that is really reused, and user-data errors that name the problem."""

import os

# Before datasets is imported anywhere: a hub lookup must fail at once, not after 20 s of retries.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import ast
import dataclasses
import json
import re
import time

import pytest

from ministacks.data import (
    DOMAINS, DataConfig, Example, UserDataError, general_corpus, general_text, load_domain_splits, load_split,
    load_user_data, raw_text, recipe_dir, render_alpaca,
)
from ministacks.data import math as math_module
from ministacks.data.general import prose_read as general_prose_read
from ministacks.data import splits as splits_module
from ministacks.evaluation.tasks import score_math

SMALL = DataConfig(max_examples=300, n_val=30, n_test=30)
ICD_CODE = re.compile(r"^[A-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?$")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="module")
def built(cache):
    return {d: load_domain_splits(d, SMALL, cache) for d in DOMAINS}


# --- template and Example -------------------------------------------------------------------------

def test_render_alpaca_is_the_papers_template():
    expected = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nI\n\n### Input:\nX\n\n"
        "### Response:\nR"
    )
    assert render_alpaca("I", "X", "R") == expected
    ex = Example("chat", "I", "X", "R", None, "test")
    assert ex.prompt() == expected[:-1] and ex.prompt().endswith("### Response:\n")
    assert ex.text() == ex.prompt() + "R"
    assert Example.from_dict(json.loads(json.dumps(ex.to_dict()))) == ex


def test_bad_names_and_config_raise_clear_errors(cache):
    with pytest.raises(ValueError, match="valid domains are chat, code, math, medical, reasoning"):
        load_split("poetry", "train", SMALL, cache)
    with pytest.raises(ValueError, match="valid splits are train, val, test"):
        load_split("math", "dev", SMALL, cache)
    with pytest.raises(ValueError, match="leaves no training data"):
        DataConfig(max_examples=50, n_val=30, n_test=30)
    with pytest.raises(ValueError, match="arithmetic_share must be in"):
        DataConfig(arithmetic_share=1.5)


# --- the five domains ---------------------------------------------------------------------------

def test_every_domain_has_complete_examples(built):
    for domain, by_split in built.items():
        assert [len(by_split[s]) for s in ("test", "val")] == [SMALL.n_test, SMALL.n_val], domain
        assert 0 < len(by_split["train"]) <= SMALL.max_examples - SMALL.n_val - SMALL.n_test
        for ex in (e for examples in by_split.values() for e in examples):
            assert ex.domain == domain and ex.instruction.strip() and ex.response.strip() and ex.source
            assert len(ex.text()) <= SMALL.max_example_chars
            assert len(ex.response) <= SMALL.max_response_chars


def test_answer_conventions(built):
    every = {d: [e for examples in s.values() for e in examples] for d, s in built.items()}
    assert all(e.answer is None for e in every["chat"] + every["code"])
    for ex in every["math"]:
        assert re.fullmatch(r"-?\d+(\.\d+)?", ex.answer), ex.answer
        assert ex.response.endswith(f"#### {ex.answer}")
    for ex in every["reasoning"]:
        assert ex.answer and ex.response.startswith("<think>\n") and ex.response.endswith(f"</think>\n{ex.answer}")
    icd = [e for e in every["medical"] if e.source == "simple-icd-10-cm"]
    assert icd and all(ICD_CODE.match(e.answer) and e.response == e.answer for e in icd)
    assert all(e.answer is None for e in every["medical"] if e.source != "simple-icd-10-cm")
    # the three medical sources are mixed, not one swamping the others
    kinds = {e.source.split(":")[1] if ":" in e.source else e.source for e in built["medical"]["train"]}
    assert kinds == {"hp.obo", "phenotype.hpoa", "simple-icd-10-cm"}
    assert len({e.source.split(":")[1] for e in every["reasoning"]}) == len(SMALL.reasoning_tasks)


def test_code_responses_are_functions_without_their_docstring(built):
    for ex in (e for examples in built["code"].values() for e in examples):
        fn = ast.parse(ex.response).body[0]  # dedented source must parse on its own
        assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        assert ast.get_docstring(fn) != ex.input  # the docstring is the prompt, not part of the answer
        assert f"`{fn.name}(" in ex.instruction or f".{fn.name}(" in ex.instruction


# --- math: word problems and arithmetic ------------------------------------------------------------

def test_math_holds_the_arithmetic_share_in_every_split(built, cache):
    share = SMALL.arithmetic_share
    assert share > 0
    stats = splits_module.domain_stats("math", SMALL, cache)["sources"][math_module.ARITHMETIC_SOURCE]
    for split, examples in built["math"].items():
        arithmetic = [ex.source == math_module.ARITHMETIC_SOURCE for ex in examples]
        assert set(ex.source for ex in examples) == {math_module.ARITHMETIC_SOURCE, math_module.WORD_SOURCE}
        assert sum(arithmetic) == stats[split]
        assert abs(sum(arithmetic) / len(examples) - share) < 0.02, split  # exact up to rounding
        # interleaved, not only in the whole split: the evaluation reads a split's first k
        assert abs(sum(arithmetic[:10]) - 10 * share) <= 1, split
    n = {split: sum(ex.source == math_module.ARITHMETIC_SOURCE for ex in built["math"][split]) for split in ("val", "test")}
    assert n == {"val": round(share * SMALL.n_val), "test": round(share * SMALL.n_test)}


def test_every_math_reference_is_scored_correct(built):
    for ex in (e for examples in built["math"].values() for e in examples):
        assert ex.response.endswith(f"\n#### {ex.answer}")
        assert score_math(ex.response, ex.answer), ex.response
        assert not score_math(ex.response, str(int(float(ex.answer)) + 1))  # a test that can fail
        if ex.source == math_module.ARITHMETIC_SOURCE:
            expression = ex.instruction.removeprefix("Calculate ").removesuffix(".")
            assert ex.response == f"{expression} = {ex.answer}\n#### {ex.answer}"
            assert eval(expression) == int(ex.answer)  # true division: the answer is the exact value


def test_arithmetic_keeps_exact_integer_answers_in_one_spelling():
    ex = math_module.arithmetic_example("( -( -91 / 7 ) )", "13")
    assert (ex.instruction, ex.response, ex.answer) == ("Calculate -(-91 / 7).", "-(-91 / 7) = 13\n#### 13", "13")
    assert math_module.arithmetic_example("( 5 * 3 )", "15").key() == math_module.arithmetic_example("5 * 3", "15").key()
    assert math_module.arithmetic_example("7 / 2", "3") is None  # the gym's floor division, not the value
    assert math_module.arithmetic_example("8 / 0", "0") is None
    assert math_module.arithmetic_example("2 ** 3", "8") is None  # not one of + - * /


def test_unsigned_sums_are_one_operator_on_numbers_from_0_to_100():
    exs = math_module.arithmetic(200, 0, ops="+", signed=False)
    assert len(exs) == 200 and all(ex.source == math_module.ARITHMETIC_SOURCE for ex in exs)
    for ex in exs:
        a, b = (int(t) for t in ex.instruction.removeprefix("Calculate ").removesuffix(".").split(" + "))
        assert 0 <= a <= 100 and 0 <= b <= 100 and ex.answer == str(a + b)
    signed = math_module.arithmetic(200, 0)
    assert any("-" in ex.instruction for ex in signed) and {"*", "/"} & set("".join(ex.instruction for ex in signed))
    with pytest.raises(ValueError, match="arithmetic_ops"):
        dataclasses.replace(SMALL, arithmetic_ops="+^")


def test_arithmetic_share_zero_is_the_word_problems_alone(tmp_path):
    cfg = dataclasses.replace(SMALL, arithmetic_share=0.0)
    splits = load_domain_splits("math", cfg, tmp_path)
    assert {ex.source for examples in splits.values() for ex in examples} == {math_module.WORD_SOURCE}
    # one pool, split as before arithmetic existed: the word-problem builder alone, no shares
    words = math_module.word_problems(int(cfg.max_examples * cfg.oversample), cfg.seed)
    assert splits == splits_module.make_splits("math", words, cfg)


# --- splits ---------------------------------------------------------------------------------------

def test_splits_are_disjoint_by_normalised_prompt(built):
    for domain, by_split in built.items():
        keys = {s: [e.key() for e in examples] for s, examples in by_split.items()}
        for s, k in keys.items():
            assert len(k) == len(set(k)), f"duplicate prompt inside {domain}/{s}"
        assert not set(keys["train"]) & set(keys["val"]), domain
        assert not set(keys["train"]) & set(keys["test"]), domain
        assert not set(keys["val"]) & set(keys["test"]), domain


def test_splits_are_deterministic_and_follow_the_seed(built, tmp_path):
    for domain in ("chat", "math", "reasoning"):
        again = load_domain_splits(domain, SMALL, tmp_path / "fresh")  # a rebuild, not a cache read
        assert again == built[domain], domain
    other = load_domain_splits("chat", dataclasses.replace(SMALL, seed=1), tmp_path / "fresh")
    assert [e.key() for e in other["test"]] != [e.key() for e in built["chat"]["test"]]


# --- general corpus -------------------------------------------------------------------------------

def test_general_corpus_holds_train_examples_and_train_prose_only(built, cache):
    docs = general_corpus(SMALL, cache)
    held_out = [e for by_split in built.values() for s in ("val", "test") for e in by_split[s]]
    held_keys = {e.key() for e in held_out}
    train_by_doc = {raw_text(e): e for by_split in built.values() for e in by_split["train"]}
    train_prose = general_text(SMALL, "train")
    prose = {d for d in docs if d in set(train_prose)}
    held_prose = set(general_text(SMALL, "val")) | set(general_text(SMALL, "test"))
    assert len(docs) > 0.9 * len(train_by_doc) + len(prose)
    doc_set = set(docs)
    assert not any(raw_text(e) in doc_set for e in held_out)
    assert not held_prose & doc_set
    # the train prose read is its first documents, as much text as an average domain (SMALL's domains
    # are smaller than the manual, so not all of it)
    assert prose == set(train_prose[: len(prose)]) and 0 < len(prose) < len(train_prose)
    domain_chars = sum(len(d) for d in docs if d not in prose) / len(DOMAINS)
    assert sum(map(len, prose)) <= domain_chars < sum(map(len, train_prose[: len(prose) + 1]))
    for doc in (d for d in docs if d not in prose):
        assert "### Instruction:" not in doc  # raw text, no template
        assert doc in train_by_doc, "a document that is neither a train example nor train prose"
        assert train_by_doc[doc].key() not in held_keys
    assert docs == general_corpus(SMALL, cache)
    assert docs != sorted(docs) and {e.domain for e in train_by_doc.values()} == set(DOMAINS)
    # the prose is shuffled in among the examples, not appended after them
    at = [i for i, d in enumerate(docs) if d in prose]
    assert at[0] < len(docs) // 4 and at[-1] > 3 * len(docs) // 4


def test_all_train_prose_is_read_beside_domains_larger_than_it():
    big = [Example("chat", "q", "", "x" * 10_000, None, "test")] * 500  # 1M characters per domain
    assert general_prose_read(SMALL, big) == general_text(SMALL, "train")


# --- cache ----------------------------------------------------------------------------------------

def test_cache_is_reused_and_keyed_by_config(built, cache, monkeypatch):
    folder = recipe_dir(SMALL, cache)
    files = sorted(folder.glob("*/*.jsonl"))
    assert len(files) == 3 * len(DOMAINS)
    mtimes = [f.stat().st_mtime_ns for f in files]

    def must_not_build(cfg):
        raise AssertionError("cache miss: the builder ran again")

    for domain in DOMAINS:
        monkeypatch.setitem(splits_module.BUILDERS, domain, must_not_build)
    start = time.perf_counter()
    again = {d: load_domain_splits(d, SMALL, cache) for d in DOMAINS}
    assert time.perf_counter() - start < 2.0
    assert again == built
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert recipe_dir(dataclasses.replace(SMALL, seed=1), cache) != folder
    assert recipe_dir(dataclasses.replace(SMALL, max_example_chars=1000), cache) != folder
    assert recipe_dir(dataclasses.replace(SMALL, arithmetic_ops="+"), cache) != folder
    # a field added later, left at its default, leaves the recipe (and so the cache) as it was
    assert not {"hub", "arithmetic_ops", "arithmetic_signed"} & set(splits_module.recipe(SMALL)["config"])


# --- user data ------------------------------------------------------------------------------------

MAPPING = {"instruction": "q", "input": "ctx", "response": "a"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_user_jsonl_and_csv_load(tmp_path):
    rows = [{"q": "Capital of France?", "ctx": "", "a": "Paris", "gold": "Paris"}, {"q": "2+2?", "ctx": "math", "a": "4", "gold": 4}]
    path = write_jsonl(tmp_path / "good.jsonl", [{**r, "gold": str(r["gold"])} for r in rows])
    examples = load_user_data(str(path), MAPPING, domain="quiz", answer_field="gold")
    assert [(e.domain, e.instruction, e.input, e.response, e.answer) for e in examples] == [
        ("quiz", "Capital of France?", "", "Paris", "Paris"), ("quiz", "2+2?", "math", "4", "4")]
    csv = tmp_path / "good.csv"
    csv.write_text('question,answer\n"Hello, who are you?",I am a model.\nBye,See you.\n', encoding="utf-8")
    examples = load_user_data(str(csv), {"instruction": "question", "input": None, "response": "answer"})
    assert [(e.instruction, e.input, e.response, e.answer) for e in examples] == [
        ("Hello, who are you?", "", "I am a model.", None), ("Bye", "", "See you.", None)]


def test_user_missing_column_and_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "nocol.jsonl", [{"q": "x", "ctx": "", "answer": "y"}])
    with pytest.raises(UserDataError, match=r"nocol\.jsonl.*'response'.*'a'.*\['q', 'ctx', 'answer'\]"):
        load_user_data(str(path), MAPPING)
    # row 2 lacks "a" while row 1 has it: datasets fills a null, we name file, row and field
    path = write_jsonl(tmp_path / "gap.jsonl", [{"q": "x", "ctx": "", "a": "y"}, {"q": "z", "ctx": ""}])
    with pytest.raises(UserDataError, match=r"gap\.jsonl: row 2: field 'response'"):
        load_user_data(str(path), MAPPING)


def test_user_null_and_non_string_values(tmp_path):
    path = write_jsonl(tmp_path / "null.jsonl", [{"q": "a", "ctx": "", "a": "b"}] * 2 + [{"q": None, "ctx": "", "a": "b"}])
    with pytest.raises(UserDataError, match=r"null\.jsonl: row 3: field 'instruction'.*null"):
        load_user_data(str(path), MAPPING)
    path = write_jsonl(tmp_path / "num.jsonl", [{"q": "a", "ctx": "", "a": 1}, {"q": "c", "ctx": "", "a": 2}])
    with pytest.raises(UserDataError, match=r"num\.jsonl: row 1: field 'response'.*must be a string"):
        load_user_data(str(path), MAPPING)


def test_user_unparseable_and_missing_files(tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"q": "a", "ctx": "", "a": "b"}\n{this is not json\n', encoding="utf-8")
    with pytest.raises(UserDataError, match=r"broken\.jsonl.*could not be parsed"):
        load_user_data(str(bad), MAPPING)
    with pytest.raises(UserDataError, match="file not found"):
        load_user_data(str(tmp_path / "nowhere.jsonl"), MAPPING)
    with pytest.raises(UserDataError, match="file not found"):
        load_user_data("./nowhere/data", MAPPING)
    with pytest.raises(UserDataError, match="unsupported file type"):
        load_user_data(str(write_jsonl(tmp_path / "rows.txt", [])), MAPPING)


def test_user_hub_id_offline_fails_fast():
    start = time.perf_counter()
    with pytest.raises(UserDataError, match="no network"):
        load_user_data("tatsu-lab/alpaca", {"instruction": "instruction", "input": "input", "response": "output"})
    assert time.perf_counter() - start < 2.0


def test_user_hub_id_without_network_fails_fast(monkeypatch):
    from ministacks.data import user

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")

    def unreachable(address, timeout):
        assert timeout <= 2.0
        raise OSError("Network is unreachable")

    monkeypatch.setattr(user.socket, "create_connection", unreachable)
    with pytest.raises(UserDataError, match="huggingface.co:443 cannot be reached.*no network"):
        load_user_data("owner/some-dataset", MAPPING)


def test_pretraining_can_read_a_share_of_the_corpus_in_the_template():
    from ministacks.data import general_corpus, load_split

    raw = general_corpus(SMALL)
    assert general_corpus(SMALL, template_share=0.0) == raw
    half, everything = general_corpus(SMALL, template_share=0.5), general_corpus(SMALL, template_share=1.0)
    assert len(half) == len(everything) == len(raw)
    prose = set(general_text(SMALL, "train"))
    examples = [d for d in half if d not in prose]
    assert len(examples) < len(half)  # some prose is in it
    templated = [d for d in examples if d.startswith("Below is an instruction")]
    assert 0.35 < len(templated) / len(examples) < 0.65
    # the prose has no instruction or response: raw text whatever the share, in the same places
    assert [d in prose for d in everything] == [d in prose for d in raw]
    assert all(d.startswith("Below is an instruction") for d in everything if d not in prose)
    assert set(templated) <= set(everything)  # an example's choice does not depend on the share's neighbours
    # never a validation or test example, templated or not
    held_out = {ex.text() for d in DOMAINS for s in ("val", "test") for ex in load_split(d, s, SMALL)}
    assert not held_out & set(everything)
    with pytest.raises(ValueError, match="template_share"):
        general_corpus(SMALL, template_share=1.5)
