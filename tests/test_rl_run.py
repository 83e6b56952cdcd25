"""RL where it runs: `train --rl` aligns each named domain's last stack before it is frozen, `rl --run`
aligns a finished run's last-trained domain, and a blow-up in RL never reaches a later domain's stack."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import ministacks.stages.rl as rl_stage
from ministacks.__main__ import main
from ministacks.presets import SMOKE
from ministacks.stacks.layer import stacked_layers
from ministacks.stacks.manifest import read_manifest
from ministacks.stacks.store import named_stacked_layers, stack_paths
from ministacks.stages.continual import run_continual
from ministacks.stages.pretrain import ensure_base


def _preset(rl=()):
    cc = replace(SMOKE.continual, domains=("chat", "math"), rounds=1, steps=4, ns_examples=8, rl=rl)
    return replace(SMOKE, continual=cc, stack=replace(SMOKE.stack, eval_every=2, max_val_examples=8))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("rl_base")
    ensure_base(SMOKE, out, progress=False)
    return out


def test_train_rl_aligns_each_named_domain_before_the_next_starts(base, tmp_path):
    m = run_continual(_preset((("chat", "dpo"), ("math", "grpo"))), base, tmp_path, progress=False)
    by_domain = {s["domain"]: s for s in m["stacks"]}
    for domain, method in (("chat", "dpo"), ("math", "grpo")):
        r = by_domain[domain]["rl"]
        assert r["method"] == method and r["before"]["n"] > 0 and r["after"]["n"] == r["before"]["n"]
        assert r["steps_run"] == SMOKE.rl.steps or r["guard"] is not None
        assert r["measures"][0]["step"] == 0 and r["measures"][-1]["step"] == r["steps_run"]
        stored = json.loads(stack_paths(tmp_path, domain, 1)[1].read_text())["meta"]["rl"]
        assert stored == r  # the stack's own record says it was aligned, and how
    assert by_domain["math"]["rl"]["before"]["measure"] == "accuracy"  # GRPO: the greedy answers' reward
    assert by_domain["chat"]["rl"]["before"]["measure"] == "pair_accuracy"  # DPO: the true reply preferred
    summary = json.loads((tmp_path / "rl.json").read_text())
    assert sorted(summary["domains"]) == ["chat", "math"] and (tmp_path / "rl.png").stat().st_size > 10_000
    assert not (tmp_path / "rl_in_progress").exists()


def test_rl_run_aligns_the_last_trained_domain_only(base, capsys, varying_reward):
    tmp_path = base / "sft_only"  # a run folder inside the base's (`rl --run` finds the base beside it)
    run_continual(_preset(), base, tmp_path, progress=False)
    before = load_file(stack_paths(tmp_path, "math", 1)[0])
    assert main(["rl", "--run", str(tmp_path), "--domain", "chat", "--method", "dpo", "--no-progress"]) == 2
    assert "last-trained domain" in capsys.readouterr().err
    assert main(["rl", "--run", str(tmp_path), "--domain", "math", "--method", "grpo", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "math grpo" in out and "validation loss" in out
    m = read_manifest(tmp_path)
    r = m["stacks"][-1]["rl"]
    assert r["method"] == "grpo" and m["stacks"][0].get("rl") is None
    after = load_file(stack_paths(tmp_path, "math", 1)[0])
    assert r["updates"] > 0 and (any(not torch.equal(before[k], after[k]) for k in before) or r["guard"] is not None)
    # again: the run is aligned already, nothing is redone; another method is refused
    assert main(["rl", "--run", str(tmp_path), "--domain", "math", "--method", "grpo", "--no-progress"]) == 0
    assert torch.equal(next(iter(load_file(stack_paths(tmp_path, "math", 1)[0]).values())), next(iter(after.values())))
    assert main(["rl", "--run", str(tmp_path), "--domain", "math", "--method", "reinforce", "--no-progress"]) == 2
    assert main(["train", "--preset", "smoke", "--out", str(base / "x"), "--rl", "chat=grpo"]) == 2
    assert "checkable reward" in capsys.readouterr().err


def test_a_blow_up_in_rl_is_restored_and_never_trained_on(base, tmp_path, monkeypatch):
    """A fault injected into chat's DPO: its stack on disk is the last good one, and math trains on top of it."""
    good = {}
    real = rl_stage.align_stack

    def faulty(model, *a, **k):
        def fault(m, update):
            if update == 1:
                good.update({f"{path}.{key}": v.clone() for path, layer in named_stacked_layers(m)
                             for key, v in layer.active.state_dict().items()})
            if update == 2:
                for layer in stacked_layers(m):
                    for name, p in layer.active.named_parameters():
                        if "lora_B" in name:
                            p.data.mul_(float("inf"))
        return real(model, *a, **{**k, "after_update": fault if k["owner"]["domain"] == "chat" else None})

    monkeypatch.setattr(rl_stage, "align_stack", faulty)
    m = run_continual(_preset((("chat", "dpo"), ("math", "grpo"))), base, tmp_path, progress=False)
    chat = m["stacks"][0]
    assert chat["rl"]["guard"] is not None and chat["rl"]["steps_run"] < SMOKE.rl.steps
    stored = load_file(stack_paths(tmp_path, "chat", 1)[0])
    assert stored.keys() == good.keys()
    for k, v in stored.items():
        assert torch.isfinite(v).all() and torch.equal(v, good[k]), k
    # math trained on the restored stack: every number after it is finite
    math_ = m["stacks"][1]
    assert all(x == x and abs(x) < 1e6 for x in (math_["pre_loss"], math_["best_loss"]))
    assert all(v is not None and v == v for v in m["forgetting"]["matrix"][1])
