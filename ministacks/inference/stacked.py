"""Inference with a trained run: the base, its frozen stacks from disk, and the meta-router (docs/brainstacks.md §6–7).

    prompt ──► router (base alone, stacks off) ──► p_d per domain ──► weights (chat ≥ 0.2, p ≤ 0.12 off)
                                                                           │
    template(prompt) ──► base + Σ_d w_d · stacks of d (fused, skipped domains cost nothing) ──► answer

Three modes, the paper's §5.3 comparison, and a fourth beside it:
    base      every stack off
    ungated   every stack on at weight 1 (what continual training's forgetting matrix measures)
    routed    the router's weights for this prompt (the paper's rule: a switched-on domain at weight p_d)
    switched  the domains the router switches on, each at weight 1: the router's on/off decision without
              its probabilities scaling a domain's stacks down (p < 1 also shrinks a domain's own stack)
and any hand-given weights ({"chat": 1, "math": 0.5}), which `chat`'s /force command uses.

A StackedRun is built from its parts (a model with its stacks loaded, the tokenizer, the router); the
run folder's loader, run.py's `load_run("runs/demo")`, builds one from what `train` and `route` wrote.
Given a `cache` (inference/offload.py's StackCache) the model starts with no stack, and every answer
first makes its mode's domains resident: the disk-offloaded engine.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn as nn

from ..data import render_alpaca
from ..lm.tokenizer import Tokenizer
from ..routing.router import MetaRouter, prompt_features, routing_weights
from ..stacks.layer import StacksOn, stacks_on
from ..stacks.selection import SKIP_THRESHOLD
from .offload import StackCache, live_domains

MODES = ("base", "ungated", "routed", "switched")
ROUTED_MODES = ("routed", "switched")  # the modes whose stacks depend on the prompt


class StackedRun:
    """A model with its frozen stacks and (optionally) its router, ready to route and generate.

    `where` names the run in messages (its folder); `cache`, when given, loads the stacks a mode needs
    (`stacks_for`) instead of the model holding them all."""

    def __init__(self, model: nn.Module, tok: Tokenizer, domains: tuple[str, ...], router: MetaRouter | None = None,
                 where: str = "this run", cache: StackCache | None = None):
        self.model, self.tok, self.domains, self.router, self.where = model, tok, tuple(domains), router, where
        self.cache = cache

    # -- routing -------------------------------------------------------------------------------------
    def probabilities(self, texts: list[str]) -> list[dict[str, float]]:
        """The router's p_d for every raw prompt (the base reads it with every stack off)."""
        if self.router is None:
            raise FileNotFoundError(f"no router in {self.where}: run `python -m ministacks route --run "
                                    f"{self.where}` first")
        feats, mask = prompt_features(self.model, self.tok, texts, self.router.cfg)
        p = self.router.probabilities(feats, mask)
        return [dict(zip(self.router.domains, row.tolist())) for row in p]

    def route(self, text: str) -> dict:
        """{"probs": p per domain, "weights": the inference rule's weights} for one raw prompt."""
        start = time.perf_counter()
        probs = self.probabilities([text])[0]
        weights = routing_weights(probs, self.router.cfg)
        if self.cache is not None:
            self.cache.stats.route_seconds.append(time.perf_counter() - start)
        return {"probs": probs, "weights": weights}

    def stacks_for(self, mode: str | dict[str, float] | StacksOn, text: str | None = None) -> StacksOn:
        """Which stacks a mode switches on: "base", "ungated", "routed" or "switched" (which route `text`), or given
        weights (checked against the run's domains). Nothing about the model changes here: run it with
        `with stacks_on(model, stacks_for(...))`. A StacksOn is returned as it is (weights decided elsewhere,
        as the evaluation decides a whole list of prompts' routes at once).

        With a cache, the stacks the answer runs are made resident here (StackCache.need)."""
        on = self._stacks_for(mode, text)
        if self.cache is not None:
            self.cache.need(live_domains(on, self.domains))
        return on

    def _stacks_for(self, mode: str | dict[str, float] | StacksOn, text: str | None) -> StacksOn:
        if isinstance(mode, StacksOn):
            return mode
        if isinstance(mode, dict):
            return StacksOn.weighted(check_weights(mode, self.domains))
        if mode == "base":
            return StacksOn.base_only()
        if mode == "ungated":
            return StacksOn.ungated()
        if mode in ROUTED_MODES:
            if text is None:
                raise ValueError(f"{mode} mode needs the prompt to route")
            weights = self.route(text)["weights"]
            return StacksOn.weighted(weights if mode == "routed" else at_full_weight(weights))
        raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)} or a dict of weights")

    # -- generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, text: str, mode: str | dict[str, float] | StacksOn = "routed", max_new_tokens: int = 96,
                 prompt: str | None = None, route_text: str | None = None, repetition_penalty: float = 1.2) -> dict:
        """Greedy answer to `text` (rendered in the Alpaca template, or `prompt` as given) in `mode`.
        The router reads `route_text` (default: `text`), the raw prompt without the template.
        Returns {"completion", "weights"} (weights as StacksOn.as_json: None = ungated, {} = base)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a whole number of at least 1, not {max_new_tokens!r}")
        prompt = prompt if prompt is not None else render_alpaca(text, "")
        # the router was trained on raw prompts (no template), so it routes the raw text, not `prompt`
        on = self.stacks_for(mode, route_text if route_text is not None else text)
        ids = self.tok.encode(prompt, bos=True)
        # the answer gets whatever context the prompt leaves, and a prompt that leaves none is an error
        # (cutting its start would change what is asked)
        room = self.model.cfg.max_seq_len - len(ids)
        if room < 1:
            raise ValueError(f"the prompt is {len(ids)} tokens; this model's context is {self.model.cfg.max_seq_len}")
        with stacks_on(self.model, on):  # set for this answer only: the model is back as it was afterwards
            out = self.model.generate(torch.tensor([ids]), min(max_new_tokens, room),
                                      repetition_penalty=repetition_penalty, eos_id=self.tok.eos_id)
        completion = self.tok.decode([t for t in out[0, len(ids):].tolist() if t != self.tok.eos_id])
        return {"completion": completion, "weights": on.as_json()}


def at_full_weight(weights: dict[str, float]) -> dict[str, float]:
    """The same domains switched on, each at weight 1 (switched mode): {chat .2, code .9} -> {chat 1, code 1}."""
    return {d: 1.0 for d in weights}


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
    """A route as a person reads it; `weights` as results record it (StacksOn.as_json)."""
    if weights is None:
        return "ungated (every stack at 1)"
    live = {d: w for d, w in weights.items() if w > SKIP_THRESHOLD}  # at or below the threshold: skipped
    if not live:
        return "base (every stack off)"
    return ", ".join(f"{d} {w:.2f}" for d, w in sorted(live.items(), key=lambda kv: -kv[1]))
