"""Pretraining from random init: it learns, checkpoints are bitwise, a killed run resumes exactly."""

import json
from dataclasses import replace

import pytest
import torch

from ministacks.checkpoint import load_latest
from ministacks.data import general_corpus
from ministacks.io import load_tensors
from ministacks.stages.pretrain import base_tokenizer, stage_pretrain
from ministacks.presets import SMOKE, with_vocab
from ministacks.lm.base import load_base
from ministacks.lm.pretrain import PretrainConfig, get_batch, lr_at, pretrain, split_documents, unigram_entropy


@pytest.fixture(scope="module")
def setup():
    tok = base_tokenizer(SMOKE)
    docs = general_corpus(SMOKE.data)
    return with_vocab(SMOKE, tok.vocab_size), tok, docs


def _tiny(cfg: PretrainConfig, **kw) -> PretrainConfig:
    return replace(cfg, samples_per_domain=0, **kw)


def test_smoke_pretraining_beats_unigram_entropy(setup, tmp_path):
    preset, tok, docs = setup
    res = pretrain(preset.model, _tiny(preset.pretrain), tok, docs, tmp_path, progress=False)
    s = res.summary
    first, last = s["val_curve"][0][1], s["val_loss"]
    assert first > s["unigram_entropy"]  # random init is worse than unigram counts ...
    assert last < s["unigram_entropy"] - 0.5  # ... and pretraining goes well below them: context is used
    assert s["tokens_per_second"] > 0 and s["params"] == res.model.num_params()


def test_checkpoint_round_trip_is_bitwise(setup, tmp_path):
    preset, tok, docs = setup
    cfg = _tiny(preset.pretrain, steps=4, ckpt_every=4, eval_every=4)
    res = pretrain(preset.model, cfg, tok, docs, tmp_path, progress=False)
    ckpt = load_latest(tmp_path / "checkpoints")
    assert ckpt.state["step"] == 4
    saved = res.model.state_dict_for_save()
    assert saved.keys() == ckpt.model.keys()
    assert all(torch.equal(saved[k], ckpt.model[k]) for k in saved)
    model, tok2 = load_base(tmp_path)
    x = torch.randint(0, tok.vocab_size, (2, 16))
    assert torch.equal(model(x).logits, res.model(x).logits)
    assert tok2.fingerprint() == tok.fingerprint()
    # the optimizer moments were saved too, not just the weights
    assert any(k.endswith("exp_avg_sq") for k in ckpt.optimizer[0])


class Killed(Exception):
    pass


def test_killed_run_resumes_to_identical_weights(setup, tmp_path):
    preset, tok, docs = setup
    cfg = _tiny(preset.pretrain, steps=10, ckpt_every=4, eval_every=3)
    full = pretrain(preset.model, cfg, tok, docs, tmp_path / "full", progress=False)

    def kill_at_7(step):  # 7 is past the step-4 checkpoint and before the step-8 one
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        pretrain(preset.model, cfg, tok, docs, tmp_path / "resumed", progress=False, on_step=kill_at_7)
    assert load_latest(tmp_path / "resumed" / "checkpoints").state["step"] == 4
    resumed = pretrain(preset.model, cfg, tok, docs, tmp_path / "resumed", progress=False)
    a, b = full.model.state_dict_for_save(), resumed.model.state_dict_for_save()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.summary["val_curve"] == full.summary["val_curve"]
    assert [s for s, _ in resumed.summary["train_curve"]] == list(range(1, 11))


def test_resume_with_other_config_is_refused(setup, tmp_path):
    preset, tok, docs = setup
    pretrain(preset.model, _tiny(preset.pretrain, steps=2, ckpt_every=2), tok, docs, tmp_path, progress=False)
    with pytest.raises(ValueError, match="different configuration"):
        pretrain(preset.model, _tiny(preset.pretrain, steps=3, lr=1e-4), tok, docs, tmp_path, progress=False)


def test_batches_are_a_function_of_seed_and_step():
    stream = torch.arange(1000)
    assert torch.equal(get_batch(stream, 5, 4, 16, seed=0), get_batch(stream, 5, 4, 16, seed=0))
    assert not torch.equal(get_batch(stream, 5, 4, 16, seed=0), get_batch(stream, 6, 4, 16, seed=0))
    b = get_batch(stream, 0, 4, 16, seed=0)
    assert torch.equal(b[:, 1:] - b[:, :-1], torch.ones(4, 15, dtype=torch.long))  # contiguous windows


def test_lr_schedule_warms_up_then_decays():
    cfg = PretrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_unigram_entropy_and_document_split():
    assert unigram_entropy(torch.tensor([0, 1, 2, 3]), 8) == pytest.approx(torch.log(torch.tensor(4.0)).item())
    docs = [f"doc {i}" for i in range(100)]
    train, val = split_documents(docs, 0.1, seed=0)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == sorted(docs)
    assert split_documents(docs, 0.1, seed=0) == (train, val)


def test_pretrain_stage_writes_json_plot_and_samples(tmp_path):
    s = stage_pretrain(SMOKE, tmp_path, progress=False)
    on_disk = json.loads((tmp_path / "pretrain.json").read_text())
    for key in ("val_loss", "val_curve", "tokens_per_second", "params", "vocab_size", "samples", "unigram_entropy"):
        assert key in on_disk
    assert on_disk["val_loss"] == s["val_loss"] == on_disk["val_curve"][-1][1]
    assert (tmp_path / "pretrain_loss.png").stat().st_size > 10_000
    assert set(on_disk["samples"]) == {"chat", "code", "math", "medical", "reasoning"}
    assert all(item["completion"] is not None for items in on_disk["samples"].values() for item in items)
    assert load_tensors(tmp_path / "base" / "model.safetensors")
