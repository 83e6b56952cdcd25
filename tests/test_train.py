"""The one stack-training loop: the best-stack guard, the boosting stop rule, the loss definition, every
stack's own seed, and a round checkpoint that only its own round resumes."""

from dataclasses import replace

import pytest
import torch

from ministacks.data import load_split
from ministacks.lm.model import ModelConfig, Transformer
from ministacks.stages.pretrain import base_tokenizer
from ministacks.presets import SMOKE
from ministacks.stacks.layer import add_stack, freeze_active, inject_stacks, make_adapter, stacked_layers
from ministacks.training.sft import STACKS_PER_SEED, BoostConfig, CheckpointMismatchError, StackTrainConfig, boost_domain, stack_seed, train_round
from ministacks.training.examples import IGNORE, ExampleSet, PackedExamples, encode_example, example_loss, example_losses


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


class _EveryPosition(torch.nn.Module):
    """The same model without `at`: it computes every position's logits (as a Hugging Face model does)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def test_per_example_losses_need_the_scored_positions_only(tok, model):
    """forward(at=mask) is the full logits at the mask, and every loss computed from the scored positions alone
    (our model) equals the one from every position's logits (a model without `at`)."""
    exs = load_split("math", "val", SMOKE.data)[:6]
    data = ExampleSet(tok, exs, completion_only=True, max_len=256, batch_size=4)
    x, y = data.batches[0]
    at = torch.nn.functional.pad(y[:, 1:] != IGNORE, (0, 1), value=False)
    with torch.no_grad():
        assert model(x, at=at).logits.shape == (int(at.sum()), tok.vocab_size)
        assert torch.allclose(model(x, at=at).logits, model(x).logits[at], atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        model(x, labels=y, at=at)
    assert torch.allclose(example_losses(model, data), example_losses(_EveryPosition(model), data), atol=1e-5)
    assert example_loss(model, data) == pytest.approx(example_loss(_EveryPosition(model), data), rel=1e-6)


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


# -- every stack has its own seed ----------------------------------------------------------------------------


def test_stack_seed_is_distinct_for_every_stack_and_every_run_seed():
    seeds = {stack_seed(base, n) for base in range(3) for n in range(50)}
    assert len(seeds) == 150
    assert stack_seed(0, 7) == stack_seed(0, 7)  # deterministic: a resumed run gets the seed it had
    with pytest.raises(ValueError, match="STACKS_PER_SEED"):
        stack_seed(0, STACKS_PER_SEED)


def _flat_A(adapter):
    return adapter.lora_A.detach().flatten()


def test_two_domains_first_stacks_start_from_different_A_matrices(model, chat):
    """Two stacks of one run must not start from (nearly) the same A: with a seed per round index they
    did (cosine 0.99996 between chat's and code's A after 2 steps), so the code stack began as chat's."""
    train, _ = chat
    cfg = replace(CFG, steps=2, eval_every=2)
    scripted = iter([1.0, 0.9, 1.0, 0.9])  # pre-round, one eval, for each round
    chat_round = train_round(model, make_adapter("moe"), train, lambda: next(scripted), cfg, progress=False)
    freeze_active(model, "chat")
    code_round = train_round(model, make_adapter("moe"), train, lambda: next(scripted), cfg, progress=False)
    assert (chat_round.stack_index, code_round.stack_index) == (0, 1) and chat_round.seed != code_round.seed
    for layer in stacked_layers(model):
        a, b = _flat_A(layer.stacks["chat"][0]), _flat_A(layer.active)
        assert abs(float(torch.nn.functional.cosine_similarity(a, b, dim=0))) < 0.5


def _recording(monkeypatch, train):
    """Record the inputs of every training batch drawn from `train`."""
    seen = []
    real = train.batch

    def batch(step, batch_size, seed):
        x, y = real(step, batch_size, seed)
        seen.append(x)
        return x, y

    monkeypatch.setattr(train, "batch", batch)
    return seen


def test_two_rounds_of_a_domain_see_different_batches(model, chat, monkeypatch):
    train, _ = chat
    seen = _recording(monkeypatch, train)
    values = iter([2.0, 1.0, 1.0, 0.5])  # each round: pre, then one eval; round 2 gains 0.5: no stop
    rounds = boost_domain(model, "chat", make_adapter("moe"), train, lambda: next(values),
                          replace(CFG, steps=1, eval_every=1), BoostConfig(max_rounds=2), progress=False)
    assert len(rounds) == 2 and len(seen) == 2
    assert not torch.equal(seen[0], seen[1])  # step 0 of round 1 and step 0 of round 2
    assert [r.seed for r in rounds] == [stack_seed(CFG.seed, 0), stack_seed(CFG.seed, 1)]


def test_moe_and_lora_on_a_fresh_base_see_the_same_seed_and_batches(tok, chat, monkeypatch):
    """Experiment 1 compares the two adapters on the same data order and seed: both are stack 0."""
    train, _ = chat
    seen = _recording(monkeypatch, train)
    results = []
    for kind in ("moe", "lora"):
        torch.manual_seed(0)
        m = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=4, n_kv_head=2,
                                    max_seq_len=256))
        inject_stacks(m)
        values = iter([1.0, 0.9, 0.8])
        results.append(train_round(m, make_adapter(kind), train, lambda: next(values),
                                   replace(CFG, steps=2, eval_every=2), progress=False))
    assert results[0].seed == results[1].seed
    assert len(seen) == 4 and torch.equal(seen[0], seen[2]) and torch.equal(seen[1], seen[3])


# -- a round's checkpoint belongs to that round --------------------------------------------------------------


def test_a_checkpoint_is_refused_by_any_other_round(tok, chat, tmp_path):
    train, _ = chat
    cfg = replace(CFG, steps=2, eval_every=2)

    def fresh(frozen=0):
        torch.manual_seed(0)
        m = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=4, n_kv_head=2,
                                    max_seq_len=256))
        inject_stacks(m)
        for _ in range(frozen):
            add_stack(m, make_adapter("moe"))
            freeze_active(m, "chat")
        return m

    values = iter([1.0, 0.9])
    done = train_round(fresh(), make_adapter("moe"), train, lambda: next(values), cfg, progress=False,
                       ckpt_dir=tmp_path, owner={"domain": "chat", "round": 1})
    # the same round again: resumed from its finished checkpoint (no evaluation at all)
    again = train_round(fresh(), make_adapter("moe"), train, lambda: 1 / 0, cfg, progress=False,
                        ckpt_dir=tmp_path, owner={"domain": "chat", "round": 1})
    assert again.val_curve == done.val_curve and again.seed == done.seed
    # another domain's round, or the same owner on a model that already holds a stack more: refused
    for model, owner in ((fresh(), {"domain": "code", "round": 1}), (fresh(frozen=1), {"domain": "chat", "round": 1})):
        with pytest.raises(CheckpointMismatchError, match=f"{tmp_path}.*holds the checkpoint of.*Delete"):
            train_round(model, make_adapter("moe"), train, lambda: 1 / 0, cfg, progress=False, ckpt_dir=tmp_path,
                        owner=owner)
