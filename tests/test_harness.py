"""lm-evaluation-harness over a run (evaluation/harness.py): with a model whose log-probs are known in closed
form, every request type and a local multiple-choice task score exactly what the arithmetic says; the
paper's mean-log-prob rule picks what it should where the harness's sum rule does not."""

import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from ministacks.evaluation import humaneval  # noqa: E402
from ministacks.evaluation.harness import StackedLM, evaluate, route_text  # noqa: E402
from ministacks.evaluation.harness_tasks import harness_lines, humaneval_results, write_task  # noqa: E402
from ministacks.inference.stacked import StackedRun  # noqa: E402
from ministacks.lm.decode import decode  # noqa: E402

PAD, EOS, BOS = 0, 1, 29  # letters a..z are ids 2..27
V = 31
HIT = 5.0  # the logit of the successor token; every other token's logit is 0
LOG_Z = math.log(math.exp(HIT) + V - 1)  # log of the softmax's normaliser at every position


class Letters:
    """One token per lowercase letter; nothing else."""

    pad_id, eos_id = PAD, EOS

    def encode(self, text, bos=False, eos=False):
        return [BOS] * bos + [2 + ord(c) - ord("a") for c in text] + [EOS] * eos

    def decode(self, ids):
        return "".join(chr(ord("a") + i - 2) for i in ids if 2 <= i <= 27)


class Successor(nn.Module):
    """Predicts the next letter of the alphabet: log p(next = x + 1) = HIT - LOG_Z, any other token -LOG_Z."""

    cfg = SimpleNamespace(max_seq_len=48)

    def forward(self, x):
        logits = torch.zeros(*x.shape, V)
        logits.scatter_(2, (x + 1).clamp(max=V - 1)[..., None], HIT)
        return SimpleNamespace(logits=logits)

    def generate(self, input_ids, max_new_tokens, temperature=0.0, repetition_penalty=1.0, eos_id=None,
                 generator=None, **_):
        return decode(lambda step, seq: self(seq).logits[:, -1], input_ids, max_new_tokens, self.cfg.max_seq_len,
                      temperature=temperature, repetition_penalty=repetition_penalty, eos_id=eos_id,
                      generator=generator)


def expected(context: str, continuation: str) -> float:
    """log p(continuation | context) by the closed form: each token the successor of the one before it."""
    before = (context or "")[-1:]
    total = 0.0
    for c in continuation:
        total += (HIT if before and ord(c) == ord(before) + 1 else 0.0) - LOG_Z
        before = c
    return total


@pytest.fixture
def lm():
    return StackedLM(StackedRun(Successor(), Letters(), ("chat",)), mode="base", batch_size=3)


def _requests(*args):
    return [SimpleNamespace(args=a) for a in args]


def test_loglikelihood_is_the_closed_form_and_greedy_is_exact(lm):
    pairs = [("a", "bcd"), ("a", "bdc"), ("mn", "opq"), ("x", "y"), ("ab", "zz"), ("c", "defghij")]
    got = lm.loglikelihood(_requests(*pairs))
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        assert ll == pytest.approx(expected(ctx, cont), abs=1e-4)
        assert greedy == (expected(ctx, cont) == pytest.approx(len(cont) * (HIT - LOG_Z)))
    assert [g for _, g in got] == [True, False, True, True, False, True]


def test_rolling_loglikelihood_scores_every_token_once_across_windows(lm):
    text = "abcdefghijklmnopqrstuvwxyz" * 3  # 78 tokens: two windows of the 48-token context
    (total,) = lm.loglikelihood_rolling(_requests((text,)))
    # <bos> predicts the first letter (a miss); after it every letter is a hit but each "z" -> "a"
    n_miss = 1 + 2
    assert total == pytest.approx(len(text) * -LOG_Z + (len(text) - n_miss) * HIT, abs=1e-3)


def test_generate_until_stops_at_the_stop_string_and_the_budget(lm):
    out = lm.generate_until(_requests(("a", {"until": ["f"], "max_gen_toks": 20}), ("k", {"until": [], "max_gen_toks": 4}),
                                      ("a", {"until": ["f"], "max_gen_toks": 20})))
    assert out == ["bcde", "lmno", "bcde"]


def test_a_local_multiple_choice_task_scores_as_expected(lm, tmp_path):
    """acc (sum of log-probs), acc_norm (over characters) and acc_mean (the paper's mean per token), each
    example worked out by hand from the closed form."""
    rows = [
        {"prompt": "a", "options": ["bcd", "bdc", "xyz", "bce"], "gold": 0},  # every rule: the chain
        # sum: "bx" (1 hit, -5.27) beats "bcdefgx" (6 hits over 7 tokens, -5.9); mean and per-char: the long one
        {"prompt": "a", "options": ["bx", "bcdefgx"], "gold": 1},
        {"prompt": "m", "options": ["nop", "nqp"], "gold": 1},  # every rule picks "nop": wrong
        {"prompt": "k", "options": ["zz", "lm"], "gold": 1},
    ]
    write_task(tmp_path, "toy_choice", rows, {
        "output_type": "multiple_choice", "doc_to_text": "prompt", "doc_to_choice": "options",
        "doc_to_target": "gold", "target_delimiter": "",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]})
    picks = {"acc": [], "acc_norm": [], "acc_mean": []}
    for r in rows:
        lls = [expected(r["prompt"], o) for o in r["options"]]
        for rule, score in (("acc", lls), ("acc_norm", [ll / len(o) for ll, o in zip(lls, r["options"])]),
                            ("acc_mean", [ll / len(o) for ll, o in zip(lls, r["options"])])):
            picks[rule].append(float(max(range(len(score)), key=score.__getitem__) == r["gold"]))
    assert picks == {"acc": [1, 0, 0, 1], "acc_norm": [1, 1, 0, 1], "acc_mean": [1, 1, 0, 1]}
    result = evaluate(lm.run, ["toy_choice"], modes=("base",), include_path=tmp_path, batch_size=2)
    got = result["toy_choice"]["base"]
    for metric, values in picks.items():
        assert got[metric]["value"] == pytest.approx(sum(values) / len(values)) and got[metric]["n"] == 4
        low, high = got[metric]["interval"]
        assert low < got[metric]["value"] < high
    assert result["truncated"]["base"]["loglikelihood"] == 0
    table = "\n".join(harness_lines(result))
    assert "| toy_choice | acc_mean | 0.750" in table


def test_routed_requests_read_the_alpaca_prompt_inside_the_context():
    ctx = "### Instruction:\nsay hi\n\n### Input:\nto me\n\n### Response:\nhi\n\n### Instruction:\nadd 2\n\n### Input:\n\n\n### Response:\n"
    assert route_text(ctx) == "add 2"
    assert route_text("What is 2 + 2?") == "What is 2 + 2?"


def test_a_routed_mode_without_a_router_is_refused():
    with pytest.raises(FileNotFoundError, match="route --run"):
        StackedLM(StackedRun(Successor(), Letters(), ("chat",)), mode="routed")


def test_humaneval_scoring_passes_the_canonical_solution_and_fails_a_wrong_one_in_the_sandbox():
    p = humaneval.load_problems(1)[0]
    doc = {"task_id": p.task_id, "code_prompt": p.prompt, "entry_point": p.entry_point, "test": p.test,
           "canonical_solution": p.canonical_solution, "timeout": humaneval.TIMEOUT}
    assert humaneval_results(doc, [p.canonical_solution]) == {"pass_at_1": 1.0}
    assert humaneval_results(doc, ["    return None\n"]) == {"pass_at_1": 0.0}
