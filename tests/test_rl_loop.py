"""RL's parts around the objectives: rewards on known right and wrong answers, the guard's rules, the loop's
restore after an injected blow-up, and its exact resume after a kill."""

import math

import pytest
import torch

from ministacks.data.example import Example
from ministacks.evaluation import humaneval
from ministacks.lm.model import ModelConfig, Transformer
from ministacks.lm.tokenizer import Tokenizer
from ministacks.rl.guard import BlowUpGuard, GuardConfig
from ministacks.rl.loop import RLConfig, align_stack
from ministacks.rl.rewards import code_reward, math_reward, medical_reward, reasoning_reward, reward_for, rewardable
from ministacks.rl.samples import batch_of, reply_pairs
from ministacks.stacks.layer import AdapterConfig, add_stack, inject_stacks, make_adapter, stacked_layers


def _ex(domain, instruction, response, answer, source="test"):
    return Example(domain, instruction, "", response, answer, source)


def test_rewards_on_known_right_and_wrong_answers():
    m = _ex("math", "Calculate 57 + -34.", "57 + -34 = 23\n#### 23", "23")
    assert math_reward("", "57 + -34 = 23\n#### 23", m) == 1.0
    assert math_reward("", "57 + -34 = 24\n#### 24", m) == 0.0
    assert math_reward("", "#### ", m) == 0.0  # the format alone earns nothing
    r = _ex("reasoning", "How is Sebastian related to Kai?", "<think>\nparent\n</think>\nfather", "father")
    assert reasoning_reward("", "<think>\nhe is the parent\n</think>\nFather.", r) == 1.0
    assert reasoning_reward("", "<think>\nhe is the parent\n</think>\nmother", r) == 0.0
    assert reasoning_reward("", "<think>\nfather father", r) == 0.0  # a trace never closed: no answer
    icd = _ex("medical", "What is the ICD-10-CM code for cholera?", "A00.9", "A00.9")
    assert medical_reward("", "The code is A00.9.", icd) == 1.0
    assert medical_reward("", "The code is A00.1.", icd) == 0.0
    with pytest.raises(ValueError, match="ICD"):
        medical_reward("", "anything", _ex("medical", "Define the clinical finding: x", "a definition", None))
    with pytest.raises(ValueError, match="DPO"):
        reward_for("chat")


def test_the_code_reward_runs_the_unit_tests_in_the_sandbox():
    problem = humaneval.load_problems(1)[0]
    ex = humaneval.to_example(problem)
    assert rewardable("code", ex)
    assert code_reward("", problem.canonical_solution, ex) == 1.0
    assert code_reward("", "    return False\n", ex) == 0.0  # parses and has the right name: not enough
    stdlib = _ex("code", "Write a Python function `isabs(s)` that does the following.", "def isabs(s): ...", None)
    assert not rewardable("code", stdlib)
    with pytest.raises(ValueError, match="format check is not a reward"):
        code_reward("", "    return True\n", stdlib)


def test_the_guard_rules():
    g = BlowUpGuard(GuardConfig(jump=10.0, floor=1.0, window=3))
    assert g.problem({"loss": float("nan")}) == "loss is nan"
    assert "inf" in g.problem({"grad_norm": math.inf})
    assert "outside" in g.problem({"loss": 0.5}, rewards=[0.0, 1.5])
    # before `window` steps of history, no jump rule; after it, a value 10x the running median trips
    assert g.problem({"loss": 50.0}) is None
    for v in (2.0, 2.5, 3.0):
        g.accept({"loss": v})
    assert g.problem({"loss": 24.0}) is None  # under 10 x median 2.5
    assert "jumped" in g.problem({"loss": 26.0})
    # the floor: a loss near 0 (GRPO's) does not trip on ordinary noise
    h = BlowUpGuard(GuardConfig(window=2), {"loss": [0.001, -0.002]})
    assert h.problem({"loss": 0.5}) is None and "jumped" in h.problem({"loss": 11.0})


def _tiny():
    exs = [_ex("math", f"Calculate {a} + {b}.", f"{a} + {b} = {a + b}\n#### {a + b}", str(a + b))
           for a in range(1, 9) for b in range(1, 9)]
    tok = Tokenizer.train([e.text() for e in exs] * 3, vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=160, vocab_size=tok.vocab_size))
    inject_stacks(model)
    add_stack(model, make_adapter("moe", AdapterConfig(r=2)))
    model.eval()
    return model, tok, exs[:50], exs[50:]


def _stack(model):
    return [{k: v.clone() for k, v in layer.active.state_dict().items()} for layer in stacked_layers(model)]


CFG = RLConfig(steps=6, eval_every=3, n_eval=6, max_new_tokens=16, pairs_per_step=4, prompts_per_step=2, group=4,
               ckpt_every=2, lr=1e-2)


def test_dpo_pairs_are_true_reply_against_another_prompts():
    _, tok, train, _ = _tiny()
    pairs = reply_pairs(tok, train, 160, seed=0)
    assert len(pairs) == len(train)
    for p in pairs:
        assert p.chosen != p.rejected and p.chosen[-1] == tok.eos_id
    scored = batch_of([(p.prompt, p.chosen) for p in pairs[:3]], tok.pad_id)
    for row, p in enumerate(pairs[:3]):  # the mask is exactly the completion's tokens
        assert scored.ids[row][scored.completion[row]].tolist() == p.chosen


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_a_blow_up_restores_the_last_good_stack_and_stops(method, varying_reward):
    model, tok, train, val = _tiny()
    seen = {}

    def fault(m, update):
        seen[update] = _stack(m)  # the weights after this update
        if update == 2:  # the third step's forward then sees a stack that is nan
            for layer in stacked_layers(m):
                for name, p in layer.active.named_parameters():
                    if "lora_B" in name:
                        p.data.fill_(float("nan"))

    r = align_stack(model, tok, "math", method, train, val, lambda: 0.0, CFG, progress=False, after_update=fault)
    assert r["guard"] is not None and "nan" in r["guard"]["reason"]
    # the stack left active is the last one whose loss and gradient were sound: the one update 1 left
    for now, good in zip(_stack(model), seen[1]):
        for k in good:
            assert torch.equal(now[k], good[k]), k
    assert all(torch.isfinite(v).all() for sd in _stack(model) for v in sd.values())
    assert r["after"]["step"] == r["guard"]["step"] and r["steps_run"] < CFG.steps


def test_a_killed_run_resumes_to_the_same_result(tmp_path, varying_reward):
    class Kill(Exception):
        pass

    def kill(m, update):
        if update == 5:  # a kill after the checkpoint at step 4
            raise Kill

    model, tok, train, val = _tiny()
    full = align_stack(model, tok, "math", "grpo", train, val, lambda: 0.0, CFG, progress=False)
    end = _stack(model)
    model, tok, train, val = _tiny()
    with pytest.raises(Kill):
        align_stack(model, tok, "math", "grpo", train, val, lambda: 0.0, CFG, ckpt_dir=tmp_path, progress=False,
                    after_update=kill)
    model, tok, train, val = _tiny()  # a fresh process: the SFT stack again, then the checkpoint
    resumed = align_stack(model, tok, "math", "grpo", train, val, lambda: 0.0, CFG, ckpt_dir=tmp_path, progress=False)
    assert full["updates"] > 5 and [c["loss"] for c in resumed["curve"]] == [c["loss"] for c in full["curve"]]
    assert resumed["after"]["accuracy"] == full["after"]["accuracy"]
    for a, b in zip(_stack(model), end):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    with pytest.raises(ValueError, match="RL checkpoint"):  # another run's checkpoint is refused
        align_stack(model, tok, "math", "dpo", train, val, lambda: 0.0, CFG, ckpt_dir=tmp_path, progress=False)


def test_dpo_against_the_policys_own_replies():
    model, tok, train, val = _tiny()
    cfg = RLConfig(steps=2, eval_every=2, n_eval=6, max_new_tokens=16, pairs_per_step=4, rejected="sample")
    r = align_stack(model, tok, "math", "dpo", train, val, lambda: 0.0, cfg, progress=False)
    assert r["n_train"] > 0 and r["updates"] == 2 and r["guard"] is None
    with pytest.raises(ValueError, match="rejected"):
        align_stack(model, tok, "math", "dpo", train, val, lambda: 0.0, RLConfig(rejected="judge"), progress=False)


def test_grpo_makes_no_update_when_no_groups_rewards_vary(monkeypatch):
    monkeypatch.setattr("ministacks.rl.loop.reward_for", lambda domain: lambda prompt, reply, ex: 0.0)
    model, tok, train, val = _tiny()
    start = _stack(model)
    r = align_stack(model, tok, "math", "grpo", train, val, lambda: 0.0, CFG, progress=False)
    # a reward no reply earns: every group's rewards are all 0, every advantage is 0
    assert r["curve"] and all(c["variance_share"] == 0 and c["update"] is False for c in r["curve"])
    assert r["updates"] == 0 and r["guard"] is None and r["steps_run"] == CFG.steps
    for now, before in zip(_stack(model), start):  # AdamW never stepped: the stack is the SFT stack
        for k in before:
            assert torch.equal(now[k], before[k]), k
    cfg = RLConfig(**{**CFG.__dict__, "kl_beta": 0.1})  # with a KL term there is a gradient all the same
    model, tok, train, val = _tiny()
    assert align_stack(model, tok, "math", "grpo", train, val, lambda: 0.0, cfg, progress=False)["updates"] > 0
