"""The continual outer loop: bookkeeping, zero forgetting in isolation, resume after a kill (at any step of
finishing a round), the reference mode's evaluations, every stack's seed, and null-space capacity."""

import json
import warnings
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import ministacks.training.continual as continual
import ministacks.training.sft as sft
from ministacks.run import prepared_base
from ministacks.stages.common import domain_val
from ministacks.stages.continual import run_continual
from ministacks.stages.pretrain import ensure_base
from ministacks.training.continual import load_basis
from ministacks.training.projection import project_out
from ministacks.presets import SMOKE
from ministacks.stacks.layer import StacksOn, set_stacks, stacked_layers
from ministacks.stacks.store import load_all_stacks, stack_paths
from ministacks.stacks.manifest import read_manifest
from ministacks.training.sft import stack_seed
from ministacks.training.examples import example_loss


def _preset(domains, rounds=1, steps=4, **kw):
    cc = replace(SMOKE.continual, domains=tuple(domains), rounds=rounds, steps=steps, **{"ns_examples": 8, **kw})
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
        set_stacks(model, StacksOn.weighted({e: 1.0 for e in domains[: i + 1]}))
        val = domain_val(preset, tok, d, preset.stack)
        recorded = [s for s in m["stacks"] if s["domain"] == d][-1]["best_loss"]
        assert example_loss(model, val) == pytest.approx(recorded, abs=2e-4)
        assert m["forgetting"]["matrix"][i][i] == pytest.approx(recorded, abs=2e-4)  # the diagonal is the same thing


class Killed(Exception):
    pass


def test_a_run_killed_mid_round_resumes_to_the_same_stacks(base, tmp_path, monkeypatch):
    preset = _preset(["chat", "code"], rounds=2, steps=6)
    ref = run_continual(preset, base, tmp_path / "ref", progress=False)

    real_round = sft.train_round  # the boosting loop (sft.boost_domain) calls it
    assert [(s["domain"], s["round"]) for s in ref["stacks"]][-1] == ("code", 2)  # code's second round runs

    def killing_round(*args, **kwargs):
        # the round is named by the owner the boosting loop gives it, not by counting steps: a round the
        # guard stops early must not move the kill into another round
        inner, owner, calls = kwargs.get("after_step"), kwargs.get("owner"), {"steps": 0}

        def after_step(model):
            if inner is not None:
                inner(model)
            calls["steps"] += 1
            # chat's rounds and code's first done and saved, code's second half way: the resumed run must
            # keep training code with the basis it started with, although code_r01 now changes later layers' inputs
            if owner == {"domain": "code", "round": 2} and calls["steps"] == 3:
                raise Killed

        kwargs["after_step"] = after_step
        return real_round(*args, **kwargs)

    monkeypatch.setattr(sft, "train_round", killing_round)
    with pytest.raises(Killed):
        run_continual(preset, base, tmp_path / "run", progress=False)
    monkeypatch.setattr(sft, "train_round", real_round)
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


def _stack_tensors(preset, base, run):
    """Every stack of a run, as reloaded from disk: [(domain, [state dict per layer]), ...] in load order."""
    model, _ = prepared_base(preset, base)
    assert load_all_stacks(run, model, read_manifest(run)) == []
    layers = list(stacked_layers(model))
    return [(d, [layer.stacks[d][j].state_dict() for layer in layers]) for d in layers[0].stacks
            for j in range(len(layers[0].stacks[d]))]


def _without_timing(stacks):
    return [{k: v for k, v in s.items() if k != "seconds_per_step"} for s in stacks]


# -- a kill at any step of finishing a round --------------------------------------------------------------------

KILL_PRESET = _preset(["chat", "code"], rounds=1, steps=2)


@pytest.fixture(scope="module")
def uninterrupted(base, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    return run, run_continual(KILL_PRESET, base, run, progress=False)


def _kill_before_save(monkeypatch):  # after train_round's last checkpoint and the freeze
    def save_stack(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(continual, "save_stack", save_stack)


def _kill_after_save(monkeypatch):  # stack files written, the manifest does not list them yet
    real = continual.save_stack

    def save_stack(*args, **kwargs):
        real(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(continual, "save_stack", save_stack)


def _kill_after_manifest(monkeypatch):  # the manifest lists the stack; its checkpoint is still there
    def rmtree(path, **kwargs):
        raise Killed

    monkeypatch.setattr(continual, "shutil", SimpleNamespace(rmtree=rmtree))


@pytest.mark.parametrize("kill", [_kill_before_save, _kill_after_save, _kill_after_manifest])
def test_a_kill_while_finishing_a_round_resumes_to_the_same_run(base, tmp_path, monkeypatch, uninterrupted, kill):
    """A kill between any two steps of finishing chat's round: the resumed run is the uninterrupted one. Killed
    after the manifest entry, the finished checkpoint of chat round 1 used to be resumed by code's round 1."""
    ref_run, ref = uninterrupted
    with monkeypatch.context() as patch:
        kill(patch)
        with pytest.raises(Killed):
            run_continual(KILL_PRESET, base, tmp_path, progress=False)
    assert (tmp_path / continual.ROUND_IN_PROGRESS).is_dir()  # a finished checkpoint was left behind
    resumed = run_continual(KILL_PRESET, base, tmp_path, progress=False)
    assert _without_timing(resumed["stacks"]) == _without_timing(ref["stacks"])
    assert resumed["forgetting"] == ref["forgetting"]
    got, want = _stack_tensors(KILL_PRESET, base, tmp_path), _stack_tensors(KILL_PRESET, base, ref_run)
    assert [d for d, _ in got] == [d for d, _ in want] == ["chat", "code"]
    for (_, a), (_, b) in zip(got, want):
        assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert not (tmp_path / continual.ROUND_IN_PROGRESS).exists()


# -- reference mode, seeds and capacity: one 3-domain run in the released code's enforcement -------------------

TIGHT = _preset(["chat", "code", "math"], rounds=1, steps=4, ns_mode="reference", ns_k=16, ns_examples=16)


@pytest.fixture(scope="module")
def tight_reference_run(base, tmp_path_factory):
    """chat, code, math in reference mode with K = 16: code's basis takes 16 of the 32 k/v outputs (the cap,
    half), math's 2 x 16 would take all 32, so the cap binds there. Returns (run folder, manifest, warnings)."""
    run = tmp_path_factory.mktemp("tight")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = run_continual(TIGHT, base, run, progress=False)
    return run, manifest, [str(w.message) for w in caught if "null-space capacity" in str(w.message)]


def test_reference_mode_records_the_loss_of_the_stack_as_saved(base, tight_reference_run):
    """The released code projects only in training-mode forwards: its evaluations, and so the best snapshot,
    see the stack as stored. Each recorded best loss is that of the saved stacks, reloaded from disk, in the
    configuration the round ran in (earlier domains' stacks on, ungated)."""
    run, m, _ = tight_reference_run
    model, tok = prepared_base(TIGHT, base)
    assert load_all_stacks(run, model, m) == []
    for i, d in enumerate(m["domains"]):
        set_stacks(model, StacksOn.weighted({e: 1.0 for e in m["domains"][: i + 1]}))
        recorded = [s for s in m["stacks"] if s["domain"] == d][-1]["best_loss"]
        assert example_loss(model, domain_val(TIGHT, tok, d, TIGHT.stack)) == pytest.approx(recorded, abs=2e-4), d


def test_every_stack_has_its_own_seed_and_records_it(tight_reference_run):
    run, m, _ = tight_reference_run
    seeds = [s["seed"] for s in m["stacks"]]
    assert seeds == [stack_seed(TIGHT.stack.seed, i) for i in range(len(m["stacks"]))]
    record = json.loads(stack_paths(run, "code", 1)[1].read_text())
    assert record["meta"]["seed"] == seeds[1] and record["meta"]["stack_index"] == 1


def test_a_full_projection_is_capped_with_a_warning_and_a_record(base, tight_reference_run):
    run, m, caught = tight_reference_run
    assert len(caught) == 1 and "training math" in caught[0] and "k_proj" in caught[0] and "v_proj" in caught[0]
    kv, q = "layers.0.self_attn.k_proj", "layers.0.self_attn.q_proj"
    cap = m["capacity_by_projection"]
    assert cap["code"][kv] == {"protected": 16, "d_out": 32, "share": 0.5, "asked": 16, "k_per_domain": 16,
                               "capped": False}
    assert cap["math"][kv] == {"protected": 16, "d_out": 32, "share": 0.5, "asked": 32, "k_per_domain": 8,
                               "capped": True}
    assert not cap["math"][q]["capped"] and cap["math"][q]["protected"] == 32
    assert m["capacity"]["math"] == pytest.approx(sum(r["share"] for r in cap["math"].values()) / len(cap["math"]))
    # math's k_proj delta is not zero where the projection lets it through (uncapped, it would be: no room left)
    model, _ = prepared_base(TIGHT, base)
    load_all_stacks(run, model, m)
    layer = model.get_submodule(kv)
    x = torch.randn(64, layer.in_features, generator=torch.Generator().manual_seed(0))
    delta = layer.stacks["math"][0](x).delta
    through = project_out(delta, load_basis(run, "math")[kv])
    assert through.norm() > 0.1 * delta.norm()


def test_a_run_records_its_whole_preset_and_is_loaded_with_it(base):
    """`train` records the Preset as it ran (steps per round from the continual config); the stages after it
    load the run with that record, so a preset no registry knows gets past `train`."""
    from ministacks.presets import preset_from_record
    from ministacks.run import load_run

    preset = replace(_preset(["chat"], steps=2), name="mine", router=replace(SMOKE.router, epochs=1))
    run = base / "mine"  # a run inside the base's folder, as the demo's nullspace/ is
    m = run_continual(preset, base, run, progress=False)
    assert preset_from_record(m["config"]) == replace(preset, stack=replace(preset.stack, steps=2))
    sr = load_run(run, router=False)
    assert sr.preset.name == "mine" and sr.preset.router.epochs == 1 and sr.domains == ("chat",)
    with pytest.raises(ValueError, match="contradicts"):
        load_run(run, "quick", router=False)


def test_a_null_space_run_shares_the_first_domain_bit_for_bit(base, tmp_path):
    """The null-space run takes the first domain's stacks from the run without (share_first_domain), as the
    demo's ablation does: the same files as training them again, and the same run afterwards."""
    without = _preset(["chat", "code"], rounds=2, steps=4, nullspace=False)
    with_ns = replace(without, continual=replace(without.continual, nullspace=True))
    run_continual(without, base, tmp_path / "no_nullspace", progress=False)
    shared = run_continual(with_ns, base, tmp_path / "shared", progress=False, first_from=tmp_path / "no_nullspace")
    alone = run_continual(with_ns, base, tmp_path / "alone", progress=False)
    assert shared["shared"] == {"chat": str(tmp_path / "no_nullspace")} and "shared" not in alone
    assert [(s["domain"], s["round"]) for s in shared["stacks"]] == [(s["domain"], s["round"]) for s in alone["stacks"]]
    untimed = lambda record: {k: v for k, v in record.items() if k != "seconds_per_step"}  # noqa: E731
    for s, t in zip(alone["stacks"], shared["stacks"]):  # chat copied, code trained on it: all as training alone
        assert untimed(s) == untimed(t)
        a, b = (load_file(stack_paths(tmp_path / run, s["domain"], s["round"])[0]) for run in ("shared", "alone"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (s["domain"], s["round"])
    assert shared["forgetting"] == alone["forgetting"]
    # another configuration than the null-space flag: nothing to share
    other = replace(with_ns, continual=replace(with_ns.continual, ns_k=with_ns.continual.ns_k + 1))
    with pytest.raises(ValueError, match="cannot be shared"):
        run_continual(other, base, tmp_path / "other", progress=False, first_from=tmp_path / "no_nullspace")


def test_the_subspace_analysis_is_computed_again_only_when_the_run_changed(base, tmp_path, monkeypatch):
    """`train` on a finished run reuses forgetting.json's subspace analysis (a pass over every domain's examples
    per domain) when the key of what it read (the stacks' content, the settings) is the same; otherwise it
    computes it again."""
    import ministacks.stages.continual as stage

    calls = []
    real = stage.subspace_analysis
    monkeypatch.setattr(stage, "subspace_analysis", lambda *a, **k: calls.append(1) or real(*a, **k))
    preset = _preset(["chat", "code"], steps=2)
    first = stage.train_stage(preset, tmp_path, progress=False)
    again = stage.train_stage(preset, tmp_path, progress=False)
    assert len(calls) == 1 and again["analysis"] == first["analysis"] and again["analysis_key"] == first["analysis_key"]
    # a forgetting.json whose analysis was made from something else: computed again, the same as the first
    path = tmp_path / "forgetting.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "analysis_key": "another run"}))
    third = stage.train_stage(preset, tmp_path, progress=False)
    assert len(calls) == 2 and third["analysis"] == first["analysis"]
