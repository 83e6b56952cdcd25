"""Continual domains: the outer loop of Brainstacks (docs/brainstacks.md §4), with null-space projection (docs/brainstacks.md §5).

    for domain d in curriculum order (chat → code → math → medical → reasoning):
        if null-space and d is not the first:
            V = directions the frozen stacks of earlier domains write into (randomized SVD, docs/brainstacks.md §5)
            train d's stacks with their delta projected out of V: δ − (δV)Vᵀ
        residual boosting rounds on d (sft.py), each stack frozen and saved as soon as it is trained
        forgetting row: validation loss of every domain seen so far, all stacks on (ungated)

Everything needed to resume is on disk: one safetensors file + JSON per stack, the basis V of every
domain, the round in progress (sft.py checkpoints it), and `manifest.json`, updated after each step
of the loop. Run the same command again after a kill and it continues where it stopped; the end result
is the same as an uninterrupted run. Finishing a round is four steps, and a kill between any two of
them resumes to the same stacks:

    train_round's last checkpoint (finished)   kill after it: the round is not in the manifest, so the
    freeze, save_stack (tensors, then JSON)      checkpoint is resumed (it returns at once) and saved again
    manifest entry                              kill after it: the checkpoint names a (domain, round) the
    RUN/round_in_progress removed                manifest lists, so it is stale and discarded on resume

A checkpoint that names a round which is neither saved nor the next to train is refused (sft.py's
CheckpointMismatchError): it would otherwise become a duplicate, or a stack of the wrong domain.

Null-space capacity (docs/brainstacks.md §5): each earlier domain claims K directions of every projection's output,
so a narrow projection (k/v: n_kv_head × head_dim) can fill up. `ns_max_share` caps the protected
share of each projection; where the cap binds, each earlier domain keeps fewer (its strongest)
directions there, a warning says which projections, and the manifest records it per projection.

This module is the loop itself, on a model and data already prepared (`train_domains`), and the undo
of a run (`repair_run`); stages/continual.py builds the base and the data from a Preset, creates or
checks the manifest and writes the figures.

The loss is the same everywhere (examples.py's `example_loss`): round results, the forgetting matrix and
the "zero forgetting in isolation" check all use it — the paper's Table 2 and forgetting matrix did not.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import load_latest
from ..data import DOMAINS
from ..io import atomic_save_tensors, load_tensors
from ..stacks.layer import AdapterConfig, StacksOn, make_adapter, set_stacks
from ..stacks.store import repair_command, save_stack, stack_name, stack_paths
from ..stacks.manifest import read_manifest, write_manifest
from .nullspace import build_basis, capacity_by_projection, capacity_report, capacity_warning
from .projection import attach_projection, detach_projection, make_after_step
from .sft import BoostConfig, RoundResult, StackTrainConfig, boost_domain, boosting_done
from .examples import ExampleSet, PackedExamples, example_loss


@dataclass(frozen=True)
class ContinualConfig:
    domains: tuple[str, ...] = DOMAINS  # curriculum order (docs/brainstacks.md §4)
    rounds: int = 2  # most boosting rounds per domain (paper: Gemma 2; TinyLlama up to 3)
    steps: int | None = None  # steps per round; None = the preset's stack steps
    eval_every: int | None = None  # steps between a round's validation passes; None = the preset's stack setting
    nullspace: bool = True  # project new stacks out of earlier stacks' output directions
    ns_k: int = 16  # directions per earlier domain (paper: 32 TinyLlama, 64 Gemma; our d_model is 256)
    ns_examples: int = 200  # validation examples whose deltas define the directions (paper: 200 / 400)
    ns_mode: str = "strict"  # "strict": also project each expert's B after every step; "reference": released code
    ns_basis: str = "per_domain"  # "per_domain": K per earlier domain, united (paper); "sum": top-K of the sum (code)
    ns_data: str = "previous"  # "previous": earlier domains' validation examples (paper); "new": the new domain's (code)
    # most of each projection's output space the earlier domains may protect (ours; the paper has no cap).
    # Its own runs stay below it (TinyLlama: 3 × 32 of the 256 k/v outputs = 37.5%; Gemma 3 12B: 4 × 64 of
    # 2048 = 12.5%), but our narrow k/v projections fill up: the new domain keeps at least half of every output
    ns_max_share: float = 0.5
    # (domain, method) pairs: RL ("dpo", "grpo" or "reinforce") on the domain's last stack before it is
    # frozen and the next domain starts (Algorithm 2, line 4; `train --rl chat=dpo,math=grpo`)
    rl: tuple[tuple[str, str], ...] = ()


ROUND_IN_PROGRESS = "round_in_progress"  # RUN/round_in_progress: train_round's checkpoints of the current round
RL_IN_PROGRESS = "rl_in_progress"  # RUN/rl_in_progress: the RL checkpoints of a domain's last stack (--rl)

# RL on a domain's last stack before it is frozen (the stage's rl/loop.py align_stack, wrapped): called as
# align(model, checkpoint folder, the round's result, {"domain", "round"}, after_step) and returning the RL
# result; after_step is the strict null-space projection of B (None without it), run after every RL update
# as after every SFT step, so the aligned stack is stored as orthogonal as the SFT one
Align = Callable[[nn.Module, Path, RoundResult, dict, Callable[[nn.Module], None] | None], dict]


def _discard_if_saved(ckpt_dir: Path, manifest: dict) -> None:
    """Remove a round (or RL) checkpoint whose (domain, round) the manifest already lists: a kill between the
    manifest entry and the checkpoint's removal leaves it behind, and resuming from it would add the
    saved stack a second time. Any other checkpoint is left for train_round (or the RL loop), which
    resumes it if it is the next round's and refuses it otherwise."""
    ckpt = load_latest(ckpt_dir)
    if ckpt is None:
        return
    ident = ckpt.state.get("identity") or {}
    if any((s["domain"], s["round"]) == (ident.get("domain"), ident.get("round")) for s in manifest["stacks"]):
        shutil.rmtree(ckpt_dir)


def _basis(model: nn.Module, run: Path, domain: str, earlier: list[str], ns_data: dict[str, ExampleSet],
           cc: ContinualConfig) -> dict[str, torch.Tensor]:
    """The directions `domain`'s stacks must stay out of: built once, before its first round, and stored."""
    basis_file = run / "bases" / f"{domain}.safetensors"
    if basis_file.is_file():
        # resuming: the stored basis, not a new one — the domain's own saved rounds now change the
        # inputs of later layers, so directions recomputed now would differ from those trained with
        return load_tensors(basis_file)
    basis = build_basis(model, {d: ns_data[d] for d in earlier}, cc.ns_k, mode=cc.ns_basis,
                        new_domain_data=ns_data[domain] if cc.ns_data == "new" else None, max_share=cc.ns_max_share)
    atomic_save_tensors(basis_file, basis)  # stored before any round: reproducible, inspectable
    return basis


def train_domains(model: nn.Module, run: Path, manifest: dict, data: dict[str, tuple[PackedExamples, ExampleSet]],
                  ns_data: dict[str, ExampleSet], cc: ContinualConfig, stack: StackTrainConfig,
                  adapter: AdapterConfig, boost: BoostConfig, progress: bool = True,
                  align: dict[str, Align] | None = None) -> dict:
    """The outer loop: every domain of `cc.domains` in order, on `model` (the base with the stacks of
    `manifest` already loaded), writing each stack and the manifest into `run` as soon as it exists.
    `align[d]`: RL on d's last stack before it is frozen (`Align`); its result goes into the stack's record.

    `data[d]` is d's (training windows, validation set); `ns_data[d]` the examples whose deltas define
    d's null-space directions. Domains the manifest marks done are skipped: their stacks are loaded,
    and their forgetting rows were written when they finished. Returns the manifest."""
    domains = list(cc.domains)
    ckpt_dir, rl_dir = run / ROUND_IN_PROGRESS, run / RL_IN_PROGRESS
    _discard_if_saved(ckpt_dir, manifest)
    _discard_if_saved(rl_dir, manifest)
    boost = replace(boost, max_rounds=cc.rounds)  # the continual run's own round budget per domain
    for i, domain in enumerate(domains):
        saved = [s["best_loss"] for s in manifest["stacks"] if s["domain"] == domain]
        if domain in manifest["done"]:
            if not boosting_done(saved, boost):  # a stack entry was removed by hand
                raise ValueError(
                    f"{run / 'manifest.json'} marks {domain} as trained, but its stacks stop at round {len(saved)} "
                    "before its boosting loop did (was an entry removed by hand?). Repair: "
                    f"{repair_command(run, domain, len(saved) + 1)}, then run this command again")
            continue
        t0 = time.time()
        train, val = data[domain]
        basis, after_step, earlier = None, None, domains[:i]
        if cc.nullspace and earlier:
            basis = _basis(model, run, domain, earlier, ns_data, cc)
            ns_capacity = capacity_by_projection(basis, cc.ns_k, len(earlier), cc.ns_basis, cc.ns_max_share)
            message = capacity_warning(domain, ns_capacity, cc.ns_max_share)
            if message:
                warnings.warn(message, stacklevel=2)
            # reference mode is the released code: projected in training-mode forwards only, so the round's
            # evaluations (and the best-snapshot choice) see the stack as it will be stored
            attach_projection(model, basis, training_only=cc.ns_mode == "reference")
            after_step = make_after_step(basis, cc.ns_mode)

        aligned: dict[int, dict] = {}  # round -> the RL result of its stack (the domain's last round, with --rl)

        def rl_round(r: int, res: RoundResult, domain=domain) -> None:
            aligned[r] = align[domain](model, rl_dir, res, {"domain": domain, "round": r + 1}, after_step)

        def save_round(r: int, res: RoundResult) -> None:
            # the stack is on disk before the manifest names it, and the round's checkpoints go last:
            # a kill between any two of these resumes to the same stacks (module docstring)
            record = {"domain": domain, "round": r + 1, **res.to_dict()}
            if r in aligned:
                record["rl"] = aligned[r]
            save_stack(run, model, domain, r + 1, "moe", adapter, meta=record)
            manifest["stacks"].append(record)
            write_manifest(run, manifest)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            shutil.rmtree(rl_dir, ignore_errors=True)

        boost_domain(model, domain, make_adapter("moe", adapter), train, lambda: example_loss(model, val), stack, boost,
                     progress=progress, after_step=after_step, saved=saved, ckpt_dir=ckpt_dir, after_round=save_round,
                     before_freeze=rl_round if align and domain in align else None)
        detach_projection(model)  # frozen stacks run as they are stored (strict mode made them orthogonal)
        set_stacks(model, StacksOn.ungated())  # the forgetting row: every domain so far, all stacks on
        manifest["forgetting"]["matrix"][i] = [example_loss(model, data[d][1]) if j <= i else None
                                               for j, d in enumerate(domains)]
        if basis is not None:
            manifest.setdefault("capacity", {})[domain] = _mean(capacity_report(basis).values())
            manifest.setdefault("capacity_by_projection", {})[domain] = ns_capacity
        manifest["timings"][domain] = manifest["timings"].get(domain, 0.0) + time.time() - t0
        manifest["done"].append(domain)
        write_manifest(run, manifest)
    return manifest


def check_domains(domains: Sequence[str]) -> None:
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; choose from {', '.join(DOMAINS)}")


def repair_run(run: str | Path, domain: str, round: int) -> list[str]:
    """Undo a run back to just before stack (domain, round), so that running the command that trained it
    again retrains from there: that stack, the domain's later rounds and every later domain's stacks are
    removed (each was trained on top of it), with what was computed from them — their forgetting rows,
    the null-space bases of later domains (built from the removed stacks' outputs), capacity records and
    the round in progress. Earlier stacks and the domain's own basis (built before its first round, from
    earlier domains only) stay. Returns the names of the removed stacks.

    The manifest is written first, then the files are deleted: a kill in between leaves only files that no
    manifest names, which retraining overwrites."""
    run = Path(run)
    manifest = read_manifest(run)
    if manifest is None:
        raise FileNotFoundError(f"no trained run in {run} (no manifest.json)")
    domains = manifest["domains"]
    if domain not in domains:
        raise ValueError(f"{run} has no domain {domain!r}; its domains: {', '.join(domains)}")
    have = sorted(s["round"] for s in manifest["stacks"] if s["domain"] == domain)
    if not 1 <= round <= len(have) + 1:  # len + 1: the round after the last one saved (one removed by hand)
        raise ValueError(f"{run} has {domain} round(s) {have or 'none'}: --from {domain}:N takes N from 1 to {len(have) + 1}")
    first = domains.index(domain)

    def kept(s: dict) -> bool:
        i = domains.index(s["domain"])
        return i < first or (i == first and s["round"] < round)

    removed = [s for s in manifest["stacks"] if not kept(s)]
    manifest["stacks"] = [s for s in manifest["stacks"] if kept(s)]
    manifest["done"] = [d for d in manifest.get("done", []) if domains.index(d) < first]
    for i, d in enumerate(domains[first:], start=first):
        manifest["forgetting"]["matrix"][i] = [None] * len(domains)
        for key in ("capacity", "capacity_by_projection", "timings"):
            manifest.get(key, {}).pop(d, None)
    write_manifest(run, manifest)
    for s in removed:
        for path in stack_paths(run, s["domain"], s["round"]):
            path.unlink(missing_ok=True)
    for d in domains[first + 1 :]:
        (run / "bases" / f"{d}.safetensors").unlink(missing_ok=True)
    shutil.rmtree(run / ROUND_IN_PROGRESS, ignore_errors=True)
    shutil.rmtree(run / RL_IN_PROGRESS, ignore_errors=True)
    return [stack_name(s["domain"], s["round"]) for s in removed]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(1, len(values))


def load_basis(run: str | Path, domain: str) -> dict[str, torch.Tensor]:
    return load_tensors(Path(run) / "bases" / f"{domain}.safetensors")
