"""Byte-level BPE: exact round trip on every domain's text, special tokens, caching."""

import pytest

from ministacks.data import DOMAINS, load_split
from ministacks.stages.pretrain import base_tokenizer
from ministacks.presets import SMOKE
from ministacks.lm.tokenizer import BOS, EOS, PAD, Tokenizer, train_or_load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return base_tokenizer(SMOKE)


def test_special_tokens_have_fixed_ids(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size <= SMOKE.vocab_size
    ids = tok.encode("hello", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id


@pytest.mark.parametrize("domain", DOMAINS)
def test_round_trip_every_domain_exactly(tok, domain):
    texts = [ex.text() for split in ("train", "val", "test") for ex in load_split(domain, split, SMOKE.data)]
    assert texts
    for text in texts:
        assert not any(s in text for s in (BOS, EOS, PAD)), "corpora must not contain the special-token strings"
        assert tok.decode(tok.encode(text)) == text
    # batch encoding agrees with one-by-one encoding
    assert tok.encode_batch(texts[:5]) == [tok.encode(t) for t in texts[:5]]


def test_code_indentation_and_unicode_survive(tok):
    text = "def f(x):\n\tif x:\n        return 'naïve – café ✓'\n\n\n    \t  pass  \n"
    assert tok.decode(tok.encode(text)) == text


def test_bpe_compresses(tok):
    text = load_split("medical", "val", SMOKE.data)[0].text()
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 1.5  # merges were learned, not just bytes


def test_save_load_and_cache(tmp_path):
    texts = ["the cat sat on the mat", "def add(a, b):\n    return a + b"] * 20
    a = train_or_load_tokenizer(texts, vocab_size=300, cache=tmp_path)
    files = list(tmp_path.rglob("tokenizer.json"))
    assert len(files) == 1
    b = train_or_load_tokenizer(texts, vocab_size=300, cache=tmp_path)  # cache hit
    assert a.fingerprint() == b.fingerprint()
    assert list(tmp_path.rglob("tokenizer.json")) == files
    c = train_or_load_tokenizer(texts, vocab_size=280, cache=tmp_path)  # another recipe, another file
    assert len(list(tmp_path.rglob("tokenizer.json"))) == 2 and c.vocab_size <= 280
    a.save(tmp_path / "t.json")
    assert Tokenizer.load(tmp_path / "t.json").encode(texts[1]) == a.encode(texts[1])
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        Tokenizer.load(tmp_path / "missing.json")
