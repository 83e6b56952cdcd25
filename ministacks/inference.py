"""Inference with a trained run: the base, its frozen stacks from disk, and the meta-router (spec §6–7).

    prompt ──► router (base alone, stacks off) ──► p_d per domain ──► weights (chat ≥ 0.2, p ≤ 0.12 off)
                                                                           │
    template(prompt) ──► base + Σ_d w_d · stacks of d (fused, skipped domains cost nothing) ──► answer

Three modes, the paper's §5.3 comparison:
    base      every stack off
    ungated   every stack on at weight 1 (what continual training's forgetting matrix measures)
    routed    the router's weights for this prompt
and any hand-given weights ({"chat": 1, "math": 0.5}), which `chat`'s /force command uses.

A run folder is what `train` writes (manifest.json, stacks/); its base may live beside it (`train --out X`)
or one level up (the demo's X/nullspace next to X/base). `locate_run` accepts either, and the demo
folder itself (it then uses the null-space run inside it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .data import render_alpaca
from .io import RunFileError, read_json_file
from .stacks import set_base_only, set_domain_weights
from .store import load_all_stacks, read_manifest

if TYPE_CHECKING:
    from .presets import Preset

MODES = ("base", "ungated", "routed")


@dataclass(frozen=True)
class RunPaths:
    out: Path  # the folder with base/ and tokenizer.json
    run: Path  # the folder with manifest.json and stacks/


def locate_run(path: str | Path) -> RunPaths:
    """The base folder and the stack run for `path` (a `train` run, a demo folder, or a run inside one)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder: pass the folder `python -m ministacks train --out` wrote")
    run = path
    if read_manifest(run) is None and read_manifest(path / "nullspace") is not None:
        run = path / "nullspace"  # a demo folder: its continual run with null-space projection
    if read_manifest(run) is None:
        raise FileNotFoundError(f"no trained stacks in {path} (no manifest.json): run "
                                f"`python -m ministacks train --out {path}` first")
    for out in (run, run.parent):
        if (out / "base" / "model.safetensors").is_file():
            return RunPaths(out, run)
    raise FileNotFoundError(f"{run} has stacks but no base beside it ({run}/base or {run.parent}/base)")


def preset_for_run(paths: RunPaths, name: str | None = None) -> Preset:
    """The preset the run was trained with: named, or else the one whose data and model match the run's."""
    from .presets import PRESETS, get_preset

    manifest = read_manifest(paths.run)
    config = manifest["config"]
    from .pretrain import _base_fix

    # read with the file named on failure: this is the first read of the base, before load_base checks it
    model_cfg = read_json_file(paths.out / "base" / "config.json", _base_fix(paths.out))
    if not isinstance(model_cfg, dict):
        raise RunFileError(paths.out / "base" / "config.json", f"damaged: not a ModelConfig record; {_base_fix(paths.out)}")

    def matches(p: Preset) -> bool:
        same_model = all(model_cfg.get(k) == v for k, v in asdict(p.model).items() if k != "vocab_size")
        return json.loads(json.dumps(asdict(p.data))) == config["data"] and same_model

    if name is not None:
        preset = get_preset(name)
        if not matches(preset):
            raise ValueError(f"{paths.run} was not trained with preset {name!r} (its data or model differ)")
    else:
        found = [p for p in PRESETS.values() if matches(p)]
        if len(found) != 1:
            raise ValueError(f"cannot tell which preset trained {paths.run}: pass --preset")
        preset = found[0]
    # the run's own settings where they differ from the preset's defaults
    return replace(preset, quant=config.get("quant", preset.quant))


class StackedRun:
    """A trained run, ready to route and generate: `StackedRun("runs/demo").generate("What is 2+3?")`."""

    def __init__(self, path: str | Path, preset: str | None = None, router: bool = True):
        from .experiments import prepared_base
        from .pretrain import check_run_tokenizer

        self.paths = locate_run(path)
        self.preset = preset_for_run(self.paths, preset)
        self.model, self.tok = prepared_base(self.preset, self.paths.out)
        # the base, its tokenizer and these stacks belong together (the run may sit outside RUN_MANIFESTS)
        check_run_tokenizer(self.paths.run, self.tok, self.paths.out / "tokenizer.json")
        self.manifest = read_manifest(self.paths.run)
        load_all_stacks(self.paths.run, self.model, self.manifest, strict=True)  # a damaged stack: DamagedStacksError
        self.domains = tuple(d for d in self.manifest["domains"] if any(s["domain"] == d for s in self.manifest["stacks"]))
        self.router = None
        if router:
            from .routing import load_router

            self.router = load_router(self.paths.run, self.model)

    # -- routing -------------------------------------------------------------------------------------
    def probabilities(self, texts: list[str]) -> list[dict[str, float]]:
        from .router import prompt_features

        if self.router is None:
            raise FileNotFoundError(f"no router in {self.paths.run}: run `python -m ministacks route --run "
                                    f"{self.paths.run}` first")
        feats, mask = prompt_features(self.model, self.tok, texts, self.router.cfg)
        p = self.router.probabilities(feats, mask)
        return [dict(zip(self.router.domains, row.tolist())) for row in p]

    def route(self, text: str) -> dict:
        """{"probs": p per domain, "weights": the inference rule's weights} for one raw prompt."""
        from .router import routing_weights

        probs = self.probabilities([text])[0]
        return {"probs": probs, "weights": routing_weights(probs, self.router.cfg)}

    def set_mode(self, mode: str | dict[str, float], text: str | None = None) -> dict[str, float] | None:
        """Switch the model to a mode ("base", "ungated", "routed" — which needs the prompt) or to given
        weights. Returns the domain weights in force (None = ungated, {} = base)."""
        set_base_only(self.model, False)
        if isinstance(mode, dict):
            weights = check_weights(mode, self.domains)
        elif mode == "base":
            set_base_only(self.model, True)
            return {}
        elif mode == "ungated":
            set_domain_weights(self.model, None)
            return None
        elif mode == "routed":
            if text is None:
                raise ValueError("routed mode needs the prompt to route")
            weights = self.route(text)["weights"]
        else:
            raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)} or a dict of weights")
        set_domain_weights(self.model, weights)
        return weights

    def reset(self) -> None:
        """Back to the default: every stack on at weight 1 (ungated)."""
        set_base_only(self.model, False)
        set_domain_weights(self.model, None)

    # -- generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, text: str, mode: str | dict[str, float] = "routed", max_new_tokens: int = 96,
                 prompt: str | None = None, route_text: str | None = None, repetition_penalty: float = 1.2) -> dict:
        """Greedy answer to `text` (rendered in the Alpaca template, or `prompt` as given) in `mode`.
        The router reads `route_text` (default: `text`), the raw prompt without the template.
        Returns {"completion", "weights"} (weights None = ungated, {} = base)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a whole number of at least 1, not {max_new_tokens!r}")
        prompt = prompt if prompt is not None else render_alpaca(text, "")
        weights = self.set_mode(mode, route_text if route_text is not None else text)
        try:
            ids = self.tok.encode(prompt, bos=True)
            room = self.model.cfg.max_seq_len - len(ids)
            if room < 1:
                raise ValueError(f"the prompt is {len(ids)} tokens; this model's context is {self.model.cfg.max_seq_len}")
            out = self.model.generate(torch.tensor([ids]), min(max_new_tokens, room),
                                      repetition_penalty=repetition_penalty, eos_id=self.tok.eos_id)
            completion = self.tok.decode([t for t in out[0, len(ids):].tolist() if t != self.tok.eos_id])
        finally:
            self.reset()
        return {"completion": completion, "weights": weights}


# A forced weight w scales a domain's stacks, base(x) + w·Δ_d(x). The router's weights are probabilities,
# in (SKIP_THRESHOLD, 1]; a hand-given weight may go past 1 to amplify a stack, but by 10 the added
# residual already swamps the base's activations (the answer is noise), and a weight like 1e30 turns
# them into inf/nan. So 10 is the cap: room to experiment, no silent overflow.
MAX_WEIGHT = 10.0


def check_weights(weights: dict[str, float], domains: tuple[str, ...] | None = None,
                  forced: bool = False) -> dict[str, float]:
    """`weights` as floats, or a ValueError naming the bad entry: every weight a finite number in
    [0, MAX_WEIGHT] (with `forced`, a hand-given weight: in (SKIP_THRESHOLD, MAX_WEIGHT], since a domain
    at or below the threshold is switched off, and printing it as used would mislead), every domain one
    of `domains` (the run's, when given)."""
    import math

    from .stacks import SKIP_THRESHOLD

    low = SKIP_THRESHOLD if forced else 0.0
    out = {}
    for d, w in weights.items():
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise ValueError(f"the weight of {d} is {w!r}: weights must be numbers") from None
        if not math.isfinite(w) or w < low or w > MAX_WEIGHT or (forced and w == low):
            bracket = "(" if forced else "["
            hint = (f"; a weight at or below {SKIP_THRESHOLD} switches the domain off: leave {d} out instead"
                    if forced and math.isfinite(w) and 0 <= w <= SKIP_THRESHOLD else "")
            raise ValueError(f"{d}={w:g}: weights must be finite numbers in {bracket}{low:g}, {MAX_WEIGHT:g}]{hint}")
        out[d] = w
    if domains is not None:
        unknown = sorted(set(out) - set(domains))
        if unknown:
            raise ValueError(f"no stacks for {', '.join(unknown)} in this run; it has {', '.join(domains)}")
    return out


def parse_weights(text: str, domains: tuple[str, ...] | None = None) -> dict[str, float]:
    """"chat=1,math=0.5" -> {"chat": 1.0, "math": 0.5}, with a clear error on anything else: a part that
    is not domain=number, a domain given twice, a weight outside (SKIP_THRESHOLD, MAX_WEIGHT], and (with
    `domains`, the run's) a domain the run has no stacks for."""
    weights = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        try:
            w = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise ValueError(f"cannot read {part!r}: write weights as domain=number, e.g. chat=1,math=0.5")
        if name in weights:
            raise ValueError(f"{name} is given twice in {text!r}: give each domain one weight")
        weights[name] = w
    if not weights:
        raise ValueError(f"no weights in {text!r}: write weights as domain=number, e.g. chat=1,math=0.5")
    return check_weights(weights, domains, forced=True)


def describe_weights(weights: dict[str, float] | None) -> str:
    from .stacks import SKIP_THRESHOLD

    if weights is None:
        return "ungated (every stack at 1)"
    live = {d: w for d, w in weights.items() if w > SKIP_THRESHOLD}  # at or below the threshold: skipped
    if not live:
        return "base (every stack off)"
    return ", ".join(f"{d} {w:.2f}" for d, w in sorted(live.items(), key=lambda kv: -kv[1]))
