"""Continual domains: the outer loop of Brainstacks (spec §4), with null-space projection (spec §5).

    for domain d in curriculum order (chat → code → math → medical → reasoning):
        if null-space and d is not the first:
            V = directions the frozen stacks of earlier domains write into (randomized SVD, §5)
            train d's stacks with their delta projected out of V: δ − (δV)Vᵀ
        residual boosting rounds on d (train.py), each stack frozen and saved as soon as it is trained
        forgetting row: validation loss of every domain seen so far, all stacks on (ungated)

Everything needed to resume is on disk: one safetensors file + JSON per stack, the basis V of every
domain, the round in progress (train.py checkpoints it), and `manifest.json`, updated after each step
of the loop. Run the same command again after a kill and it continues where it stopped; the end result
is the same as an uninterrupted run. Finishing a round is four steps, and a kill between any two of
them resumes to the same stacks:

    train_round's last checkpoint (finished)   kill after it: the round is not in the manifest, so the
    freeze, save_stack (tensors, then JSON)      checkpoint is resumed (it returns at once) and saved again
    manifest entry                              kill after it: the checkpoint names a (domain, round) the
    RUN/round_in_progress removed                manifest lists, so it is stale and discarded on resume

A checkpoint that names a round which is neither saved nor the next to train is refused (train.py's
CheckpointMismatchError): it would otherwise become a duplicate, or a stack of the wrong domain.

Null-space capacity (spec §5): each earlier domain claims K directions of every projection's output,
so a narrow projection (k/v: n_kv_head × head_dim) can fill up. `ns_max_share` caps the protected
share of each projection; where the cap binds, each earlier domain keeps fewer (its strongest)
directions there, a warning says which projections, and the manifest records it per projection.

The loss is the same everywhere (train.py's `example_loss`): round results, the forgetting matrix and
the "zero forgetting in isolation" check all use it — the paper's Table 2 and forgetting matrix did not.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint import load_latest
from .data import DOMAINS
from .experiments import domain_data, domain_val, ensure_base, prepared_base
from .io import atomic_save_tensors, atomic_write_json, load_tensors
from .nullspace import (attach_projection, build_basis, capacity_by_projection, capacity_report, capacity_warning,
                        detach_projection, domain_bases, make_after_step, orthogonality_by_projection,
                        singular_spectra, subspace_similarity)
from .stacks import freeze_active, make_adapter, set_domain_weights
from .store import (load_all_stacks, new_manifest, read_manifest, repair_command, save_stack, stack_name, stack_paths,
                    write_manifest)
from .train import boosting_stops, example_loss, train_round

if TYPE_CHECKING:  # presets.py imports this module's config
    from .presets import Preset


@dataclass(frozen=True)
class ContinualConfig:
    domains: tuple[str, ...] = DOMAINS  # curriculum order (spec §4)
    rounds: int = 2  # most boosting rounds per domain (paper: Gemma 2; TinyLlama up to 3)
    steps: int | None = None  # steps per round; None = the preset's stack steps
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


def _replay_stop_rule(rounds: list[dict], preset: Preset) -> bool:
    """Did the saved rounds of a domain already end its boosting loop?"""
    prev = math.inf
    for r, rec in enumerate(rounds):
        if boosting_stops(r, prev, rec["best_loss"], preset.boost):
            return True
        prev = rec["best_loss"]
    return len(rounds) >= preset.continual.rounds


ROUND_IN_PROGRESS = "round_in_progress"  # RUN/round_in_progress: train_round's checkpoints of the current round


def _discard_if_saved(ckpt_dir: Path, manifest: dict) -> None:
    """Remove a round checkpoint whose (domain, round) the manifest already lists: a kill between the
    manifest entry and the checkpoint's removal leaves it behind, and resuming from it would add the
    saved stack a second time. Any other checkpoint is left for train_round, which resumes it if it
    is the next round's and refuses it otherwise."""
    ckpt = load_latest(ckpt_dir)
    if ckpt is None:
        return
    ident = ckpt.state.get("identity") or {}
    if any((s["domain"], s["round"]) == (ident.get("domain"), ident.get("round")) for s in manifest["stacks"]):
        shutil.rmtree(ckpt_dir)


def run_continual(preset: Preset, out: str | Path, run: str | Path | None = None, progress: bool = True) -> dict:
    """Train every domain of `preset.continual` in order on the base in `out`; stacks and manifest in `run`.

    `run` defaults to `out`. Returns the manifest (with the forgetting matrix)."""
    out = Path(out)
    run = Path(run) if run is not None else out
    cc = preset.continual
    domains = list(cc.domains)
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; choose from {', '.join(DOMAINS)}")
    if cc.steps is not None:
        preset = replace(preset, stack=replace(preset.stack, steps=cc.steps))
    ensure_base(preset, out, progress)
    model, tok = prepared_base(preset, out)
    config = {"continual": asdict(cc), "stack": asdict(preset.stack), "adapter": asdict(preset.adapter),
              "boost": asdict(preset.boost), "quant": preset.quant, "data": asdict(preset.data)}
    config = json.loads(json.dumps(config))  # as it reads back from manifest.json (tuples become lists)
    manifest = read_manifest(run)
    if manifest is None:
        manifest = new_manifest(model, tok, domains, config)
        manifest["done"] = []
        write_manifest(run, manifest)
    elif manifest["config"] != config:
        raise ValueError(f"{run} holds a run with a different configuration; use another --out, or delete it")
    load_all_stacks(run, model, manifest, strict=True)  # a damaged stack: DamagedStacksError, with the repair
    ckpt_dir = run / ROUND_IN_PROGRESS
    _discard_if_saved(ckpt_dir, manifest)

    data = {d: domain_data(preset, tok, d, preset.stack) for d in domains}  # (PackedExamples, ExampleSet)
    ns_cfg = replace(preset.stack, max_val_examples=cc.ns_examples)  # the directions' own example count
    ns_data = {d: domain_val(preset, tok, d, ns_cfg) for d in domains} if cc.nullspace else {}
    for i, domain in enumerate(domains):
        if domain in manifest["done"]:
            rounds = [s for s in manifest["stacks"] if s["domain"] == domain]
            if not _replay_stop_rule(rounds, preset):  # a stack entry was removed by hand
                raise ValueError(
                    f"{run / 'manifest.json'} marks {domain} as trained, but its stacks stop at round {len(rounds)} "
                    "before its boosting loop did (was an entry removed by hand?). Repair: "
                    f"{repair_command(run, domain, len(rounds) + 1)}, then run this command again")
            continue
        t0 = time.time()
        train, val = data[domain]
        basis, after_step = None, None
        earlier = domains[:i]
        if cc.nullspace and earlier:
            basis_file = run / "bases" / f"{domain}.safetensors"
            if basis_file.is_file():
                # resuming: the stored basis, not a new one — the domain's own saved rounds now change the
                # inputs of later layers, so directions recomputed now would differ from those trained with
                basis = load_tensors(basis_file)
            else:
                basis = build_basis(model, {d: ns_data[d] for d in earlier}, cc.ns_k, mode=cc.ns_basis,
                                    new_domain_data=ns_data[domain] if cc.ns_data == "new" else None,
                                    max_share=cc.ns_max_share)
                atomic_save_tensors(basis_file, basis)  # stored before any round: reproducible, inspectable
            ns_capacity = capacity_by_projection(basis, cc.ns_k, len(earlier), cc.ns_basis, cc.ns_max_share)
            message = capacity_warning(domain, ns_capacity, cc.ns_max_share)
            if message:
                warnings.warn(message, stacklevel=2)
            # reference mode is the released code: projected in training-mode forwards only, so the round's
            # evaluations (and the best-snapshot choice) see the stack as it will be stored
            attach_projection(model, basis, training_only=cc.ns_mode == "reference")
            after_step = make_after_step(basis, cc.ns_mode)
        rounds = [s for s in manifest["stacks"] if s["domain"] == domain]
        r = len(rounds)
        while not _replay_stop_rule(rounds, preset):
            res = train_round(model, make_adapter("moe", preset.adapter), train, lambda: example_loss(model, val),
                              preset.stack, progress=progress, desc=f"{domain} round {r + 1}",
                              after_step=after_step, round_index=r, ckpt_dir=ckpt_dir,
                              owner={"domain": domain, "round": r + 1})
            freeze_active(model, domain)
            record = {"domain": domain, "round": r + 1, **res.to_dict()}
            save_stack(run, model, domain, r + 1, "moe", preset.adapter, meta=record)
            manifest["stacks"].append(record)
            write_manifest(run, manifest)  # the stack is on disk before the manifest names it
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # a kill before this leaves a stale checkpoint: see above
            rounds.append(record)
            r += 1
        detach_projection(model)  # frozen stacks run as they are stored (strict mode made them orthogonal)
        set_domain_weights(model, None)
        row = [example_loss(model, data[d][1]) if j <= i else None for j, d in enumerate(domains)]
        manifest["forgetting"]["matrix"][i] = row
        if basis is not None:
            manifest.setdefault("capacity", {})[domain] = _mean(capacity_report(basis).values())
            manifest.setdefault("capacity_by_projection", {})[domain] = ns_capacity
        manifest["timings"][domain] = manifest["timings"].get(domain, 0.0) + time.time() - t0
        manifest["done"].append(domain)
        write_manifest(run, manifest)
    atomic_write_json(run / "forgetting.json", manifest["forgetting"])
    return manifest


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
    return [stack_name(s["domain"], s["round"]) for s in removed]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(1, len(values))


def load_basis(run: str | Path, domain: str) -> dict[str, torch.Tensor]:
    return load_tensors(Path(run) / "bases" / f"{domain}.safetensors")


# -- what the figures show (the paper's Figures 8–10) ------------------------------------------------


def subspace_analysis(preset: Preset, out: str | Path, run: str | Path | None = None) -> dict:
    """Cross-domain similarity of the stacks' principal output subspaces, their singular-value spectra,
    and how orthogonal each later domain's stacks are to the directions they were kept out of."""
    out = Path(out)
    run = Path(run) if run is not None else out
    manifest = read_manifest(run)
    if manifest is None:
        raise FileNotFoundError(f"no trained run in {run}: run `python -m ministacks train --out {run}` first")
    model, tok = prepared_base(preset, out)
    load_all_stacks(run, model, manifest, strict=True)
    domains = [d for d in manifest["domains"] if d in manifest.get("done", [])]
    cc = preset.continual
    ns_cfg = replace(preset.stack, max_val_examples=cc.ns_examples)
    data = {d: domain_val(preset, tok, d, ns_cfg) for d in domains}
    bases = domain_bases(model, data, cc.ns_k)
    spectra = {d: singular_spectra(model, data[d], [d], k=cc.ns_k) for d in domains}
    orth: dict[str, list[float]] = {}
    for d in domains[1:]:
        path = run / "bases" / f"{d}.safetensors"
        if path.is_file():
            for proj, v in orthogonality_by_projection(model, load_tensors(path), data[d], domain=d)["by_projection"].items():
                orth.setdefault(proj, []).append(v)
    return {
        "domains": domains,
        "similarity": subspace_similarity(bases).tolist(),
        "spectra": {d: torch.stack(list(s.values())).mean(0).tolist() for d, s in spectra.items()},
        "orthogonality": {p: _mean(v) for p, v in orth.items()},
    }


def train_stage(preset: Preset, out: str | Path, compare_nullspace: bool = False, progress: bool = True) -> dict:
    """`train`: the continual run (or, with `compare_nullspace`, one run without and one with null-space
    projection, in out/no_nullspace and out/nullspace), then forgetting.json / .png and subspaces.json / .png."""
    from .plots import plot_forgetting, plot_subspaces

    out = Path(out)
    cc = preset.continual
    if compare_nullspace:
        runs, capacity, capacity_by_proj = {}, {}, {}
        for name, ns in (("without null-space", False), ("with null-space", True)):
            folder = out / ("nullspace" if ns else "no_nullspace")
            manifest = run_continual(replace(preset, continual=replace(cc, nullspace=ns)), out, folder, progress)
            runs[name] = manifest["forgetting"]
            capacity.update(manifest.get("capacity", {}))
            capacity_by_proj.update(manifest.get("capacity_by_projection", {}))
        a, b = runs.values()
        diff = [[None if x is None or y is None else y - x for x, y in zip(ra, rb)]
                for ra, rb in zip(a["matrix"], b["matrix"])]
        # "matrix" is the null-space run's; both runs and their difference beside it
        result = {"domains": a["domains"], "matrix": b["matrix"], "runs": runs, "difference": diff}
        analysis_run = out / "nullspace"
    else:
        name = "with null-space" if cc.nullspace else "without null-space"
        manifest = run_continual(preset, out, out, progress)
        forgetting, capacity = manifest["forgetting"], manifest.get("capacity", {})
        capacity_by_proj = manifest.get("capacity_by_projection", {})
        result = {"domains": forgetting["domains"], "matrix": forgetting["matrix"], "runs": {name: forgetting}}
        analysis_run = out
    result["capacity"] = capacity  # per domain: protected directions as a share of d_out, mean over projections
    # per domain, per projection: {"protected", "d_out", "share", "asked", "k_per_domain", "capped"} (nullspace.py)
    result["capacity_by_projection"] = capacity_by_proj
    result["analysis"] = subspace_analysis(preset, out, analysis_run)
    result["paper"] = PAPER_FORGETTING
    atomic_write_json(out / "forgetting.json", result)
    plot_forgetting(result["runs"], out / "forgetting.png")
    a = result["analysis"]
    plot_subspaces(a["similarity"], a["domains"], a["spectra"], a["orthogonality"], out / "subspaces.png")
    return result


# spec §5: TinyLlama, ungated validation loss, rows = after training, NoNS -> NS (curriculum chat, code,
# medical, math as in the paper's own run)
PAPER_FORGETTING = {
    "domains": ["chat", "code", "medical", "math"],
    "without null-space": [[None] * 4, [1.507, 0.788, None, None], [1.468, 0.814, 1.350, None],
                           [1.839, 1.512, 2.066, 1.184]],
    "with null-space": [[None] * 4, [1.477, 0.819, None, None], [1.453, 0.816, 1.234, None],
                        [1.778, 1.452, 1.984, 1.041]],
}
