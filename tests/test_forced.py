"""The exact greedy check by teacher forcing says what generating would: parity with Transformer.generate."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from ministacks.data import Example
from ministacks.evaluation.forced import greedy_matches, reproduces
from ministacks.evaluation.modes import Weights, mode_weights, paired_difference
from ministacks.routing.router import RouterConfig
from ministacks.stacks.layer import StacksOn, inject_stacks, stacked_layers
from ministacks.lm.model import ModelConfig, Transformer
from ministacks.lm.tokenizer import Tokenizer


def sharp_model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=64, vocab_size=61))
    with torch.no_grad():  # larger weights than the init's: logits far apart, no argmax near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("penalty", [1.0, 1.3, 3.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_forward_of_a_generated_answer_reproduces_it_and_a_changed_token_does_not(seed, penalty):
    model = sharp_model(seed)
    prompt = torch.randint(0, 61, (9,), generator=torch.Generator().manual_seed(seed)).tolist()
    out = model.generate(torch.tensor([prompt]), 12, repetition_penalty=penalty)[0].tolist()
    answer = out[len(prompt):]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + answer[:-1]])).logits[0]  # the last prompt position onwards
    rows = logits[len(prompt) - 1 :]
    assert reproduces(rows, prompt, answer, penalty)
    for t in (0, 5, 11):
        changed = list(answer)
        changed[t] = (changed[t] + 1) % 61
        assert not reproduces(rows, prompt, changed, penalty)


def test_the_penalty_is_the_one_generation_applies():
    # with a strong penalty, greedy avoids repeating: an answer generated without it reads differently
    # under it as soon as the plain answer repeats a token of the sequence
    for seed in range(6):
        model = sharp_model(seed)
        prompt = [3, 4, 5]
        plain = model.generate(torch.tensor([prompt]), 16)[0].tolist()[3:]
        penalised = model.generate(torch.tensor([prompt]), 16, repetition_penalty=5.0)[0].tolist()[3:]
        if plain == penalised:
            continue
        with torch.no_grad():
            rows = model(torch.tensor([prompt + plain[:-1]])).logits[0][2:]
        assert reproduces(rows, prompt, plain, 1.0) and not reproduces(rows, prompt, plain, 5.0)
        return
    pytest.fail("no seed gave a plain answer that the penalty changes")


class Scripted(nn.Module):
    """A 'model' that continues each known prompt with a fixed token sequence and predicts token 0
    (unknown) anywhere else: every position's prediction depends on the tokens up to it, as in a
    causal model, so padding, offsets and batching are what is tested."""

    def __init__(self, sequences: list[list[int]], vocab: int, max_seq_len: int):
        super().__init__()
        self.sequences, self.vocab = sequences, vocab
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len)
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        B, T = x.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            row = x[b].tolist()
            for i in range(T):
                nxt = next((s[i + 1] for s in self.sequences if len(s) > i + 1 and s[: i + 1] == row[: i + 1]), 0)
                logits[b, i, nxt] = 10.0
        return SimpleNamespace(logits=logits)


def test_greedy_matches_reads_every_example_at_its_own_offsets():
    tok = Tokenizer.train(["what is two plus two", "four", "the sky is blue", "name a colour"] * 30, vocab_size=300)
    examples = [Example("math", "what is two plus two", "", "four", "4", "t"),
                Example("math", "name a colour", "", "blue", None, "t"),
                Example("math", "the sky is", "", "blue", None, "t")]
    known = [tok.encode(ex.prompt(), bos=True) + tok.encode(ex.response, eos=True) for ex in examples[:2]]
    # the third prompt's known continuation differs from its reference response
    third = tok.encode(examples[2].prompt(), bos=True)
    known.append(third + tok.encode("four", eos=True))
    longest = max(map(len, known))
    model = Scripted(known, tok.vocab_size, max_seq_len=longest)
    for batch_size in (1, 2, 3):  # right padding and batch order must not change a verdict
        assert greedy_matches(model, tok, examples, 1.2, batch_size=batch_size) == [True, True, False]
    # one more example, too long for the context: None, and the others are unchanged
    long = Example("math", "what is two plus two " * 20, "", "four", "4", "t")
    assert greedy_matches(model, tok, examples + [long], 1.2) == [True, True, False, None]
    seen = []
    model.forwards = 0
    greedy_matches(model, tok, examples, 1.2, batch_size=1, before_batch=seen.append)
    assert sorted(seen) == [[0], [1], [2]] and model.forwards == 3  # one forward per example, its rows given


def test_paired_difference():
    a = {"losses": [2.0, 3.0, 4.0], "tokens": [10, 10, 20]}
    same = paired_difference(a, a)
    assert same["difference"] == 0 and same["ci95_low"] == same["ci95_high"] == 0
    shifted = paired_difference(a, {"losses": [2.5, 3.5, 4.5], "tokens": [10, 10, 20]})
    assert shifted["difference"] == pytest.approx(0.5) and shifted["ci95_low"] == pytest.approx(0.5)  # no spread
    mixed = paired_difference(a, {"losses": [1.0, 3.0, 5.0], "tokens": [10, 10, 20]})
    # d = (-1, 0, +1), weights (10, 10, 20): D = 10/40; the interval spans 0
    assert mixed["difference"] == pytest.approx(0.25) and mixed["ci95_low"] < 0 < mixed["ci95_high"]
    with pytest.raises(ValueError, match="same documents"):
        paired_difference(a, {"losses": [1.0], "tokens": [10]})


def test_weights_of_a_mode():
    class Run:  # a stand-in StackedRun whose router must not be asked about nothing
        router = SimpleNamespace(cfg=RouterConfig())

        def stacks_for(self, mode):
            return StacksOn.base_only()

        def probabilities(self, texts):
            assert texts, "the router was asked to route no prompt"
            return [{"chat": 0.05, "code": 0.9} for _ in texts]

    run = Run()
    assert mode_weights(run, "base", ["x"]) == Weights(on=StacksOn.base_only())
    assert mode_weights(run, "routed", []).per_prompt == mode_weights(run, "switched", []).per_prompt == []
    routed, switched = mode_weights(run, "routed", ["a", "b"]), mode_weights(run, "switched", ["a", "b"])
    assert routed.per_prompt[0] == {"chat": 0.2, "code": 0.9}  # the chat floor, as routing_weights gives it
    assert switched.per_prompt[1] == {"chat": 1.0, "code": 1.0}
    assert switched.take([1]).per_prompt == [{"chat": 1.0, "code": 1.0}]
    assert routed.repeat(2).per_prompt == [routed.per_prompt[0]] * 2 + [routed.per_prompt[1]] * 2
    assert Weights(on=StacksOn.ungated()).take([5]).on == StacksOn.ungated()


def test_per_prompt_weights_are_set_before_each_forward_and_undone_after():
    model = sharp_model(0)
    inject_stacks(model)
    w = Weights(per_prompt=[{"chat": 1.0}, {"math": 0.5}])
    with w.applied(model) as before_batch:
        before_batch([1])
        assert all(layer.on == StacksOn.weighted({"math": 0.5}) for layer in stacked_layers(model))
        before_batch([1, 0])  # a batch of both: row j under prompt rows[j]'s weights
        assert all(layer.on.rows == (StacksOn.weighted({"math": 0.5}), StacksOn.weighted({"chat": 1.0}))
                   for layer in stacked_layers(model))
    assert all(layer.on == StacksOn.ungated() for layer in stacked_layers(model))
    with Weights(on=StacksOn.base_only()).applied(model) as before_batch:
        assert before_batch is None and all(layer.on.base for layer in stacked_layers(model))


def test_routed_examples_in_shared_batches_score_as_each_alone():
    """Per-prompt weights batched (per-row stack weights) give every example the loss it has alone under its
    own weights: the routed modes share batches without changing a number."""
    from ministacks.training.examples import ExampleSet, example_losses
    from stacked import tiny_stacked

    words = ["apple", "banana", "cherry", "date", "elder", "fig", "grape"]
    tok = Tokenizer.train([f"name fruit {w} is {w} and more" for w in words] * 20, vocab_size=300)
    model = tiny_stacked(tok.vocab_size, ("chat", "math", "chat"), std=0.1, seed=3)
    examples = [Example("chat", f"name fruit {w}", "", f"{w} is {w}" + " and more" * (i % 3), None, "x")
                for i, w in enumerate(words)]
    routes = [{"chat": 0.9}, {"math": 0.6, "chat": 0.3}, {}, {"chat": 0.1, "math": 1.0}, {"chat": 1.0, "math": 1.0},
              {"math": 0.2}, {"chat": 0.5}]
    weights = Weights(per_prompt=routes)
    batched = ExampleSet(tok, examples, completion_only=True, max_len=512, batch_size=4)
    with weights.applied(model) as before_batch:
        shared = example_losses(model, batched, before_batch=before_batch)
    for i, ex in enumerate(examples):
        with Weights(on=StacksOn.weighted(routes[i])).applied(model):
            alone = example_losses(model, ExampleSet(tok, [ex], completion_only=True, max_len=512, batch_size=1))
        torch.testing.assert_close(shared[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    assert len({round(float(x), 4) for x in shared}) > 3  # the routes matter: the losses differ
