"""The continual outer loop: bookkeeping, zero forgetting in isolation, resume after a kill."""

from dataclasses import replace

import pytest
import torch

import ministacks.continual as continual
from ministacks.continual import run_continual
from ministacks.experiments import domain_val, ensure_base, prepared_base
from ministacks.presets import SMOKE
from ministacks.stacks import set_domain_weights, stacked_layers
from ministacks.store import load_all_stacks, read_manifest
from ministacks.train import example_loss


def _preset(domains, rounds=1, steps=4, **kw):
    cc = replace(SMOKE.continual, domains=tuple(domains), rounds=rounds, steps=steps, ns_examples=8, **kw)
    return replace(SMOKE, continual=cc, stack=replace(SMOKE.stack, eval_every=2, max_val_examples=8))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    ensure_base(SMOKE, out, progress=False)
    return out


@pytest.mark.parametrize("domains", [["chat"], ["chat", "code"], ["chat", "code", "math", "medical", "reasoning"]])
def test_forgetting_matrix_bookkeeping(base, tmp_path, domains):
    m = run_continual(_preset(domains, steps=2), base, tmp_path, progress=False)
    f = m["forgetting"]
    assert f["domains"] == domains and len(f["matrix"]) == len(domains)
    for i, row in enumerate(f["matrix"]):
        assert len(row) == len(domains)
        assert all(v is not None for v in row[: i + 1]) and all(v is None for v in row[i + 1 :])
    assert [s["domain"] for s in m["stacks"]] == domains  # one round each
    assert m["done"] == domains
    assert (tmp_path / "forgetting.json").is_file()
    assert sorted(p.name for p in (tmp_path / "bases").glob("*")) == sorted(f"{d}.safetensors" for d in domains[1:])


def test_zero_forgetting_in_isolation(base, tmp_path):
    """Each domain evaluated exactly as it was trained (its own and earlier stacks on) gives its recorded loss."""
    preset = _preset(["chat", "code", "math"], rounds=2, steps=4)
    m = run_continual(preset, base, tmp_path, progress=False)
    model, tok = prepared_base(preset, base)
    assert load_all_stacks(tmp_path, model, m) == []
    domains = m["domains"]
    for i, d in enumerate(domains):
        set_domain_weights(model, {e: 1.0 for e in domains[: i + 1]})
        val = domain_val(preset, tok, d, preset.stack)
        recorded = [s for s in m["stacks"] if s["domain"] == d][-1]["best_loss"]
        assert example_loss(model, val) == pytest.approx(recorded, abs=2e-4)
        assert m["forgetting"]["matrix"][i][i] == pytest.approx(recorded, abs=2e-4)  # the diagonal is the same thing


class Killed(Exception):
    pass


def test_a_run_killed_mid_round_resumes_to_the_same_stacks(base, tmp_path, monkeypatch):
    preset = _preset(["chat", "code"], rounds=2, steps=6)
    ref = run_continual(preset, base, tmp_path / "ref", progress=False)

    real_round = continual.train_round
    calls = {"steps": 0}

    def killing_round(*args, **kwargs):
        inner = kwargs.get("after_step")

        def after_step(model):
            if inner is not None:
                inner(model)
            calls["steps"] += 1
            # chat's two rounds and code's first done and saved, code's second half way: the resumed run must
            # keep training code with the basis it started with, although code_r01 now changes later layers' inputs
            if calls["steps"] == 6 + 6 + 6 + 3:
                raise Killed

        kwargs["after_step"] = after_step
        return real_round(*args, **kwargs)

    monkeypatch.setattr(continual, "train_round", killing_round)
    with pytest.raises(Killed):
        run_continual(preset, base, tmp_path / "run", progress=False)
    monkeypatch.setattr(continual, "train_round", real_round)
    assert (tmp_path / "run" / "round_in_progress").is_dir()  # it really died inside a round
    resumed = run_continual(preset, base, tmp_path / "run", progress=False)
    assert resumed["forgetting"] == ref["forgetting"]
    assert [s["best_loss"] for s in resumed["stacks"]] == [s["best_loss"] for s in ref["stacks"]]
    a, _ = prepared_base(preset, base)
    b, _ = prepared_base(preset, base)
    load_all_stacks(tmp_path / "ref", a, ref)
    load_all_stacks(tmp_path / "run", b, read_manifest(tmp_path / "run"))
    for la, lb in zip(stacked_layers(a), stacked_layers(b)):
        for d in la.stacks:
            for sa, sb in zip(la.stacks[d], lb.stacks[d]):
                assert all(torch.equal(x, y) for x, y in zip(sa.state_dict().values(), sb.state_dict().values()))


def test_a_run_with_another_configuration_is_refused(base, tmp_path):
    run_continual(_preset(["chat"], steps=2), base, tmp_path, progress=False)
    with pytest.raises(ValueError, match="different configuration"):
        run_continual(_preset(["chat"], steps=3), base, tmp_path, progress=False)


def test_unknown_domain_is_a_clear_error(base, tmp_path):
    with pytest.raises(ValueError, match="unknown domain"):
        run_continual(_preset(["chat", "poetry"]), base, tmp_path, progress=False)
