"""A run's files belong together and guard themselves: a refused `pretrain` changes nothing, and a
damaged base, tokenizer or router file is an error that names the file (never a traceback from torch,
safetensors or the JSON parser)."""

import json
import re
import shutil
from dataclasses import asdict, replace

import pytest

from ministacks.data import general_corpus
from ministacks.run import load_run, prepared_base
from ministacks.io import RunFileError
from ministacks.stages.pretrain import base_tokenizer
from ministacks.presets import SMOKE, with_vocab
from ministacks.lm.base import BASE_RECORD_KEYS, load_base
from ministacks.lm.pretrain import PretrainConfig, pretrain
from ministacks.routing.router import MetaRouter, RouterConfig, load_router, save_router
from ministacks.stacks.manifest import new_manifest, write_manifest
from ministacks.lm.tokenizer import Tokenizer

from damage import flip_middle_byte, truncate


def _tiny(cfg: PretrainConfig) -> PretrainConfig:
    return replace(cfg, steps=2, ckpt_every=2, eval_every=2, eval_batches=1, samples_per_domain=0)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tiny pretrained smoke base (2 steps) with a router saved beside it, reused by every test."""
    tok = base_tokenizer(SMOKE)
    preset = with_vocab(SMOKE, tok.vocab_size)
    docs = general_corpus(SMOKE.data)
    out = tmp_path_factory.mktemp("integrity") / "run"
    pretrain(preset.model, _tiny(preset.pretrain), tok, docs, out, progress=False)
    model, _ = load_base(out)
    save_router(out, MetaRouter(16, ("chat", "code"), RouterConfig()), model)
    # "another preset": another tokenizer and another model
    other_tok = Tokenizer.train(docs[:200], vocab_size=300)
    other_model = replace(preset.model, vocab_size=other_tok.vocab_size, n_layer=1)
    return {"out": out, "preset": preset, "tok": tok, "docs": docs, "other_tok": other_tok, "other_model": other_model}


@pytest.fixture
def run(built, tmp_path):
    """A private copy of the built run, free to damage."""
    dst = tmp_path / "run"
    shutil.copytree(built["out"], dst)
    return dst


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _other_pretrain(built, out):
    cfg = _tiny(built["preset"].pretrain)
    pretrain(built["other_model"], cfg, built["other_tok"], built["docs"], out, progress=False)


# -- (1) a refused command changes nothing ----------------------------------------------------------


def test_pretrain_of_another_preset_is_refused_before_writing(built, run):
    before = _snapshot(run)
    with pytest.raises(ValueError, match="different configuration"):
        _other_pretrain(built, run)
    assert _snapshot(run) == before  # tokenizer.json above all: byte-identical
    load_base(run)  # and the run still loads


@pytest.mark.parametrize("holds", ["base", "manifest.json", "nullspace/manifest.json", "no_nullspace/manifest.json"])
def test_pretrain_without_checkpoints_does_not_replace_a_base_under_stacks(built, run, holds):
    if holds != "base":
        model, tok = load_base(run)
        write_manifest((run / holds).parent, new_manifest(model, tok, ["chat"], {}))
        shutil.rmtree(run / "base")  # only the stacks' manifest says a base was here
    shutil.rmtree(run / "checkpoints")
    before = _snapshot(run)
    with pytest.raises(ValueError, match="another --out") as e:
        _other_pretrain(built, run)
    assert str(run) in str(e.value) and holds in str(e.value)
    assert _snapshot(run) == before


def test_pretrain_of_the_same_config_without_checkpoints_rewrites_the_same_base(built, run):
    before = (run / "base" / "model.safetensors").read_bytes()
    shutil.rmtree(run / "checkpoints")
    preset = built["preset"]
    pretrain(preset.model, _tiny(preset.pretrain), built["tok"], built["docs"], run, progress=False)
    assert (run / "base" / "model.safetensors").read_bytes() == before


# -- the tokenizer, the base and the stacks belong together -----------------------------------------


def test_a_tokenizer_of_another_base_is_refused(built, run):
    built["other_tok"].save(run / "tokenizer.json")
    with pytest.raises(RunFileError, match="pretrained with tokenizer") as e:
        load_base(run)
    assert str(run / "tokenizer.json") in str(e.value)


def test_an_old_base_checks_the_vocabulary_size_instead(built, run):
    config = run / "base" / "config.json"
    record = json.loads(config.read_text())
    config.write_text(json.dumps({k: v for k, v in record.items() if k not in BASE_RECORD_KEYS}))
    load_base(run)  # a base written before the records: still loads
    built["other_tok"].save(run / "tokenizer.json")
    with pytest.raises(RunFileError, match="embedding") as e:
        load_base(run)
    assert str(run / "tokenizer.json") in str(e.value) and str(config) in str(e.value)


def _write_run_manifest(run, folder, tokenizer_fp):
    model, tok = load_base(run)
    manifest = new_manifest(model, tok, ["chat"], {"data": json.loads(json.dumps(asdict(SMOKE.data))),
                                                   "quant": SMOKE.quant})
    manifest["tokenizer"] = tokenizer_fp
    write_manifest(folder, manifest)


@pytest.mark.parametrize("where", ["", "nullspace"])
def test_stacks_of_another_tokenizer_are_refused_by_prepared_base(built, run, where):
    _write_run_manifest(run, run / where, "0" * 16)
    with pytest.raises(RunFileError, match="do not belong together") as e:
        prepared_base(built["preset"], run)
    assert str(run / "tokenizer.json") in str(e.value) and str(run / where / "manifest.json") in str(e.value)


def test_stacks_of_another_tokenizer_are_refused_by_stacked_run(built, run):
    _write_run_manifest(run, run / "mine", built["tok"].fingerprint())
    load_run(run / "mine", "smoke", router=False)  # the run's own tokenizer: loads
    _write_run_manifest(run, run / "mine", "0" * 16)
    with pytest.raises(RunFileError, match="do not belong together") as e:
        load_run(run / "mine", "smoke", router=False)
    assert str(run / "mine" / "manifest.json") in str(e.value)


# -- (3) damaged files are named -------------------------------------------------------------------


def _invalid_json(path):
    if path.suffix == ".safetensors":  # its header is JSON, after an 8-byte length
        data = bytearray(path.read_bytes())
        data[8:9] = b"!"
        path.write_bytes(bytes(data))
    else:
        path.write_text('{"vocab_size": 1, oops')


FILES = ["base/model.safetensors", "base/config.json", "tokenizer.json", "router/model.safetensors", "router/config.json"]


@pytest.mark.parametrize("damage", [truncate, flip_middle_byte, _invalid_json], ids=["truncated", "flipped", "invalid_json"])
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_file_is_named(run, name, damage):
    path = run / name
    damage(path)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        model, _ = load_base(run)
        if name.startswith("router/"):
            load_router(run, model)
    assert str(path) in str(e.value)
    assert "another base" not in str(e.value)


def test_a_flipped_byte_in_the_base_says_damaged(run):
    flip_middle_byte(run / "base" / "model.safetensors")
    with pytest.raises(RunFileError, match="damaged: its sha256"):
        load_base(run)


def test_an_edited_router_setting_is_refused(run):
    config = run / "router" / "config.json"
    record = json.loads(config.read_text())
    record["router"]["temp_max"] = record["router"]["temp_max"] * 2
    config.write_text(json.dumps(record))
    model, _ = load_base(run)
    with pytest.raises(RunFileError, match="record_sha256") as e:
        load_router(run, model)
    assert str(config) in str(e.value)


def test_routers_and_bases_without_checksums_still_load(run):
    model, _ = load_base(run)
    router = load_router(run, model)
    config = run / "router" / "config.json"
    record = json.loads(config.read_text())
    old = {k: record[k] for k in ("token_dim", "domains", "router", "base_fingerprint")}
    config.write_text(json.dumps(old))
    again = load_router(run, model)
    assert all((a == b).all() for a, b in zip(router.state_dict().values(), again.state_dict().values()))


def test_a_damaged_checkpoint_is_named_with_the_folder_to_delete(run):
    """A pretraining checkpoint that cannot be read is a one-line error (a ValueError), not a traceback."""
    from ministacks.checkpoint import load_latest

    latest = load_latest(run / "checkpoints")
    truncate(latest.path / "model.safetensors")
    with pytest.raises(RunFileError, match=re.escape(str(latest.path))) as e:
        load_latest(run / "checkpoints")
    assert f"delete {run / 'checkpoints'}" in str(e.value)
    (run / "checkpoints" / "latest.json").write_text("{not json")
    with pytest.raises(RunFileError, match="checkpoint unreadable"):
        load_latest(run / "checkpoints")
