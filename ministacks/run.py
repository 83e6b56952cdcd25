"""A run folder that describes itself: where its parts are, which Preset made it, and its loader.

    OUT/                     what `pretrain` writes, and every stage after it on the same base
      base/ tokenizer.json   the pretrained base (lm/base.py) and its tokenizer
      compare.json boost.json forgetting.json report.md ...
      RUN/                   a continual run: manifest.json, stacks/, bases/, router/, router.json, eval.json
                             (RUN is OUT itself after `train --out OUT`, or OUT/nullspace and
                             OUT/no_nullspace after `demo` / `train --compare-nullspace`)

The run's manifest records the whole Preset it was trained with (presets.preset_record, under
"config"), so `route`, `eval`, `generate` and `chat` read it back instead of searching the presets
for one that looks alike; a preset passed to them only overrides the settings that do not change
the trained stacks (the router's, the evaluation's), and one that contradicts the run is refused.

`load_run(path)` is the one loader: base (checked), quantized as the run was, every stack (checked),
and the router, into an inference.StackedRun.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch.nn as nn

from .inference.offload import StackCache
from .inference.stacked import StackedRun
from .io import RunFileError
from .lm.base import has_base, is_pretrained, load_base
from .lm.pretrain import RUN_MANIFESTS
from .lm.quant import quantize_model
from .lm.tokenizer import Tokenizer
from .presets import PRESETS, Preset, contradictions, get_preset, preset_from_record, preset_record
from .routing.router import load_router
from .stacks.layer import inject_stacks
from .stacks.store import load_all_stacks
from .stacks.manifest import read_manifest


@dataclass(frozen=True)
class RunPaths:
    out: Path  # the folder with base/ and tokenizer.json
    run: Path  # the folder with manifest.json and stacks/


def locate_run(path: str | Path) -> RunPaths:
    """The base folder and the stack run for `path` (a `train` run, a demo folder, or a run inside one).

    A demo folder holds two runs; the one with null-space projection is the one `route` and `eval`
    work on, so the folder itself means that run."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder: pass the folder `python -m ministacks train --out` wrote")
    run = path
    if read_manifest(run) is None and read_manifest(path / "nullspace") is not None:
        run = path / "nullspace"
    if read_manifest(run) is None:
        raise FileNotFoundError(f"no trained stacks in {path} (no manifest.json): run "
                                f"`python -m ministacks train --out {path}` first")
    for out in (run, run.parent):
        if has_base(out):
            return RunPaths(out, run)
    raise FileNotFoundError(f"{run} has stacks but no base beside it ({run}/base or {run.parent}/base)")


def check_run_tokenizer(run: Path, tok: Tokenizer, tok_path: Path) -> None:
    """Refuse a run (RUN/manifest.json) whose stacks were trained with another tokenizer than `tok`."""
    manifest = read_manifest(run)
    recorded = manifest.get("tokenizer") if manifest is not None else None
    if recorded not in (None, tok.fingerprint()):
        raise RunFileError(tok_path, f"is tokenizer {tok.fingerprint()}, but the stacks of {run / 'manifest.json'} "
                                     f"were trained with tokenizer {recorded}: the base, the tokenizer and the "
                                     "stacks do not belong together. Put back the run's own tokenizer.json, or "
                                     "train the stacks again into another --out")


def check_run_folder(out: Path, tok: Tokenizer) -> None:
    """`check_run_tokenizer` for every run that may live in `out` (RUN_MANIFESTS)."""
    for name in RUN_MANIFESTS:
        check_run_tokenizer((out / name).parent, tok, out / "tokenizer.json")


def prepared_base(preset: Preset, out: Path) -> tuple[nn.Module, Tokenizer]:
    """The frozen base with every projection wrapped (and quantized to NF4 first if the preset says so).

    Checked on the way: the base's files against their checksums and the tokenizer against the base
    (`load_base`), and the tokenizer against the stacks of every run in `out` (`check_run_folder`).

    A folder whose base is a pretrained Hugging Face model (OUT/base/pretrained.json) gets it from scale/,
    installed beside ministacks: loaded in NF4 by bitsandbytes if the preset says so, wrapped the same way."""
    if is_pretrained(out):
        from scale.model import open_pretrained  # transformers and bitsandbytes, only for such a folder

        model, tok = open_pretrained(out, quant=preset.quant)
        check_run_folder(out, tok)
        return model, tok
    model, tok = load_base(out)
    check_run_folder(out, tok)
    if preset.quant == "nf4":
        quantize_model(model)  # before the wrapping: the stacks sit on top of the 4-bit projections
    inject_stacks(model)
    return model, tok


def run_preset(paths: RunPaths, given: Preset | str | None = None) -> Preset:
    """The Preset that trained the run, from its record; `given` (a Preset or a preset's name) replaces
    it only where it may: its router and evaluation settings. A `given` that differs from the record in
    what the stacks depend on (presets.TRAINED_WITH) is refused, naming the fields."""
    config = read_manifest(paths.run)["config"]
    if isinstance(given, str):
        given = get_preset(given)
    if "name" not in config:
        return _preset_of_older_run(paths, config, given)
    try:
        recorded = preset_from_record(config)
    except ValueError as e:
        raise RunFileError(paths.run / "manifest.json", f"damaged: its config is {e}; train the run again") from None
    if given is None:
        return recorded
    differ = contradictions(given, recorded)
    if differ:
        raise ValueError(f"--preset {given.name} contradicts {paths.run}: it was trained with preset "
                         f"{recorded.name!r}, which differs in {', '.join(differ)}. Leave --preset out to use the run's own")
    return replace(recorded, router=given.router, eval=given.eval)


def _preset_of_older_run(paths: RunPaths, config: dict, given: Preset | None) -> Preset:
    """A run written before runs recorded their Preset holds only the training configs: it needs the
    preset named, and that preset's data must be the run's."""
    if given is None:
        raise ValueError(f"{paths.run} was trained before runs recorded their preset: pass --preset "
                         f"(one of {', '.join(PRESETS)}), the one it was trained with")
    if preset_record(given)["data"] != config.get("data"):
        raise ValueError(f"{paths.run} was not trained with preset {given.name!r} (its data differ)")
    return replace(given, quant=config.get("quant", given.quant))


def load_run(path: str | Path, preset: Preset | str | None = None, router: bool = True, offload: bool = False,
             budget_bytes: int | None = None, prefetch: bool = False) -> StackedRun:
    """The run at `path`, loaded once: base, stacks and (with `router`, if `route` has been run) the router.

    Its preset is the run's own (`run_preset`), with `preset`'s router and evaluation settings if given.
    With `offload` the stacks stay on disk until an answer needs them, under `budget_bytes` with
    least-recently-used eviction, optionally read ahead (`prefetch`): inference/offload.py's engine."""
    paths = locate_run(path)
    preset = run_preset(paths, preset)
    model, tok = prepared_base(preset, paths.out)
    # the base, its tokenizer and these stacks belong together (the run may sit outside RUN_MANIFESTS)
    check_run_tokenizer(paths.run, tok, paths.out / "tokenizer.json")
    manifest = read_manifest(paths.run)
    cache = StackCache(paths.run, model, manifest, budget_bytes, prefetch) if offload else None
    if cache is None:
        load_all_stacks(paths.run, model, manifest, strict=True)  # a damaged stack: DamagedStacksError
    domains = tuple(d for d in manifest["domains"] if any(s["domain"] == d for s in manifest["stacks"]))
    return TrainedRun(paths, manifest, preset, model, tok, domains,
                      load_router(paths.run, model) if router else None, cache)


class TrainedRun(StackedRun):
    """A StackedRun loaded from its folder (`load_run`): also its paths, its manifest and its Preset."""

    def __init__(self, paths: RunPaths, manifest: dict, preset: Preset, model: nn.Module, tok: Tokenizer,
                 domains: tuple[str, ...], router=None, cache: StackCache | None = None):
        super().__init__(model, tok, domains, router, where=str(paths.run), cache=cache)
        self.paths, self.manifest, self.preset = paths, manifest, preset
