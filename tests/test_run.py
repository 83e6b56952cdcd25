"""A run folder describes itself: its manifest records the whole Preset, and the stages after `train`
read it back (run.run_preset) instead of guessing; a --preset that contradicts the run is refused."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from ministacks.io import RunFileError
from ministacks.presets import QUICK, SMOKE, contradictions, preset_from_record, preset_record
from ministacks.routing.router import RouterConfig
from ministacks.run import RunPaths, run_preset


def _run_with(tmp_path, config: dict) -> RunPaths:
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "stacks": [], "config": config}))
    return RunPaths(tmp_path, tmp_path)


# a preset no registry knows: its own name, data, router and stack settings
MINE = replace(SMOKE, name="mine", data=replace(SMOKE.data, max_examples=140), router=replace(SMOKE.router, epochs=2),
               continual=replace(SMOKE.continual, domains=("chat", "math"), rounds=1))


@pytest.mark.parametrize("preset", [SMOKE, QUICK, MINE])
def test_a_preset_survives_its_record(preset):
    record = json.loads(json.dumps(preset_record(preset)))  # as it reads back from manifest.json
    assert preset_from_record(record) == preset
    assert isinstance(preset_from_record(record).continual.domains, tuple)


def test_the_run_is_read_with_the_preset_it_recorded(tmp_path):
    assert run_preset(_run_with(tmp_path, preset_record(MINE))) == MINE


def test_a_given_preset_overrides_only_the_router_and_the_evaluation(tmp_path):
    paths = _run_with(tmp_path, preset_record(MINE))
    given = replace(MINE, name="other", router=RouterConfig(epochs=7), continual=SMOKE.continual,
                    stack=replace(MINE.stack, steps=99))
    got = run_preset(paths, given)
    assert got.router.epochs == 7 and got.eval == given.eval  # taken from the given preset
    assert got.continual == MINE.continual and got.stack == MINE.stack and got.name == "mine"  # the run's own


def test_a_preset_that_contradicts_the_run_is_refused_by_name(tmp_path):
    paths = _run_with(tmp_path, preset_record(MINE))
    with pytest.raises(ValueError, match=r"--preset quick contradicts .*preset 'mine', which differs in data, "
                                         r"vocab_size, model, pretrain"):
        run_preset(paths, "quick")
    assert contradictions(replace(MINE, quant="nf4"), MINE) == ["quant"]
    assert contradictions(replace(MINE, model=replace(MINE.model, vocab_size=123)), MINE) == []  # the tokenizer's


def test_a_run_from_before_the_record_needs_its_preset_named(tmp_path):
    older = {k: preset_record(SMOKE)[k] for k in ("continual", "stack", "adapter", "boost", "quant", "data")}
    paths = _run_with(tmp_path, older)
    with pytest.raises(ValueError, match="pass --preset"):
        run_preset(paths)
    assert run_preset(paths, "smoke") == SMOKE
    with pytest.raises(ValueError, match="was not trained with preset 'quick'"):
        run_preset(paths, "quick")


def test_a_damaged_record_names_the_manifest(tmp_path):
    record = preset_record(SMOKE)
    record["model"] = {"n_layer": "two"} | {"no_such_field": 1}
    with pytest.raises(RunFileError, match="manifest.json"):
        run_preset(_run_with(tmp_path, record))
