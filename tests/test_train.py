"""The one stack-training loop: the best-stack guard, the boosting stop rule, the loss definition."""

from dataclasses import replace

import pytest
import torch

from ministacks.data import load_split
from ministacks.model import ModelConfig, Transformer
from ministacks.pipeline import base_tokenizer
from ministacks.presets import SMOKE
from ministacks.stacks import inject_stacks, make_adapter, stacked_layers
from ministacks.train import (IGNORE, BoostConfig, ExampleSet, PackedExamples, StackTrainConfig, boost_domain,
                              encode_example, example_loss, train_round)


@pytest.fixture(scope="module")
def tok():
    return base_tokenizer(SMOKE)


@pytest.fixture()
def model(tok):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=4, n_kv_head=2,
                                max_seq_len=256))
    inject_stacks(m)
    return m


@pytest.fixture(scope="module")
def chat(tok):
    train = PackedExamples(tok, load_split("chat", "train", SMOKE.data), completion_only=False, seq_len=64)
    val = ExampleSet(tok, load_split("chat", "val", SMOKE.data), completion_only=False, max_len=64)
    return train, val


CFG = StackTrainConfig(steps=12, batch_size=4, seq_len=64, lr=3e-3, warmup_steps=2, eval_every=2)


def _active_B(model):
    return [layer.active.lora_B.detach().clone() for layer in stacked_layers(model)]


def test_guard_restores_the_best_snapshot_after_a_spike(model, chat):
    train, _ = chat
    scripted = iter([2.0, 1.8, 1.5, 1.55, 1.7])  # pre-round, then evals at steps 2, 4, 6, 8 (1.7 > 1.5 + 0.1)
    snapshots = {}

    def val_loss():
        v = next(scripted)
        if v == 1.5:
            snapshots["best"] = _active_B(model)
        return v

    r = train_round(model, make_adapter("moe"), train, val_loss, CFG, progress=False)
    assert r.stop_reason == "spike" and r.steps_run == 8
    assert r.best_loss == 1.5 and r.best_step == 4
    assert all(torch.equal(a, b) for a, b in zip(_active_B(model), snapshots["best"]))


def test_guard_restores_the_identity_when_nothing_beats_the_pre_round_loss(model, chat):
    train, _ = chat
    losses = iter([1.0, 1.01, 1.02, 1.03, 1.04, 1.05])
    r = train_round(model, make_adapter("moe"), train, lambda: next(losses), CFG, progress=False)
    assert r.stop_reason == "patience" and r.best_step == 0 and r.best_loss == 1.0
    assert all(torch.count_nonzero(b) == 0 for b in _active_B(model)), "zero-init snapshot restored"


def test_a_real_round_lowers_validation_loss(model, chat):
    train, val = chat
    r = train_round(model, make_adapter("moe"), train, lambda: example_loss(model, val), CFG, progress=False)
    assert r.best_loss < r.pre_loss - 0.05
    assert example_loss(model, val) == pytest.approx(r.best_loss, abs=1e-6)  # the restored stack is the best one
    assert r.params == sum(p.numel() for layer in stacked_layers(model) for p in layer.active.parameters())


def test_boosting_stops_when_a_round_gains_too_little(model, chat):
    train, _ = chat
    # round 1: pre 2.0 -> 1.5; round 2: 1.5 -> 1.499 (gain 0.001 < 0.002) -> stop after 2 rounds
    script = iter([2.0, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5] + [1.5, 1.499] + [1.499] * 10)
    rounds = boost_domain(model, "chat", make_adapter("moe"), train, lambda: next(script),
                          replace(CFG, steps=2, eval_every=2), BoostConfig(max_rounds=5), progress=False)
    assert len(rounds) == 2
    layer = next(stacked_layers(model))
    assert len(layer.stacks["chat"]) == 2 and layer.active is None  # the stopping round is kept


def test_boosting_runs_to_max_rounds_while_it_helps(model, chat):
    train, _ = chat
    values = iter([3.0, 2.0, 2.0, 1.0, 1.0, 0.5])  # each round: pre, then one eval
    rounds = boost_domain(model, "chat", make_adapter("lora"), train, lambda: next(values),
                          replace(CFG, steps=2, eval_every=2), BoostConfig(max_rounds=3), progress=False)
    assert [r.best_loss for r in rounds] == [2.0, 1.0, 0.5]


def test_example_loss_is_the_token_weighted_mean_over_examples(tok, model):
    exs = load_split("math", "val", SMOKE.data)[:5]
    data = ExampleSet(tok, exs, completion_only=True, max_len=256, batch_size=2)
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in exs:
            ids, labels = encode_example(tok, ex, completion_only=True, max_len=256)
            logits = model(torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            keep = target != IGNORE
            total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    assert count > 0
    assert example_loss(model, data) == pytest.approx(total / count, rel=1e-5)


def test_completion_only_scores_the_response_alone(tok):
    ex = load_split("math", "val", SMOKE.data)[0]
    ids, labels = encode_example(tok, ex, completion_only=True, max_len=10**6)
    n_prompt = len(tok.encode(ex.prompt(), bos=True))
    assert all(lab == IGNORE for lab in labels[:n_prompt])
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_id
    _, all_labels = encode_example(tok, ex, completion_only=False, max_len=10**6)
    assert all_labels == ids


def test_packed_batches_are_deterministic(chat):
    train, _ = chat
    a, b = train.batch(3, 4, seed=0), train.batch(3, 4, seed=0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(train.batch(4, 4, seed=0)[0], a[0])


class Killed(Exception):
    pass


def test_a_round_killed_mid_way_resumes_to_the_same_stack(tok, chat, tmp_path):
    train, val = chat

    def fresh():
        torch.manual_seed(0)
        m = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=4, n_kv_head=2,
                                    max_seq_len=256))
        inject_stacks(m)
        return m

    cfg = replace(CFG, steps=10, eval_every=3)
    ref_model = fresh()
    ref = train_round(ref_model, make_adapter("moe"), train, lambda: example_loss(ref_model, val), cfg,
                      progress=False, ckpt_dir=tmp_path / "ref")

    model = fresh()
    steps = []

    def kill_at_8(m):  # after the step-6 checkpoint, before the step-9 one
        steps.append(1)
        if len(steps) == 8:
            raise Killed

    with pytest.raises(Killed):
        train_round(model, make_adapter("moe"), train, lambda: example_loss(model, val), cfg, progress=False,
                    after_step=kill_at_8, ckpt_dir=tmp_path / "run")
    model = fresh()  # a new process: nothing survives but the files
    resumed_steps = []
    res = train_round(model, make_adapter("moe"), train, lambda: example_loss(model, val), cfg, progress=False,
                      after_step=lambda m: resumed_steps.append(1), ckpt_dir=tmp_path / "run")
    assert len(resumed_steps) == 4  # steps 7..10 only: it continued from the step-6 checkpoint
    assert res.val_curve == ref.val_curve and res.best_step == ref.best_step
    for a, b in zip(_active_B(model), _active_B(ref_model)):
        assert torch.equal(a, b)
    # and a finished round called again returns at once with the same result
    again_model = fresh()
    again = train_round(again_model, make_adapter("moe"), train, lambda: 1 / 0, cfg, progress=False,
                        ckpt_dir=tmp_path / "run")
    assert again.val_curve == ref.val_curve
    assert all(torch.equal(a, b) for a, b in zip(_active_B(again_model), _active_B(ref_model)))
