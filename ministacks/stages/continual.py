"""`train`: the continual run — every domain in curriculum order on one base — and what it shows.

    1. base        pretrained first if OUT has none (stages/pretrain.py), quantized as the preset says
    2. manifest    RUN/manifest.json: created with the whole Preset, or, resuming, checked against it
    3. stacks      the ones already trained, loaded and checked (a damaged one names its repair)
    4. loop        training/continual.py's train_domains: null-space basis, boosting rounds, forgetting row
    5. analysis    the stacks' output subspaces: cross-domain similarity, spectra, orthogonality
    -> forgetting.json / .png, subspaces.png (and RUN/forgetting.json per run)

With `compare_nullspace` (the demo) it trains two runs on the same base, OUT/no_nullspace and
OUT/nullspace, and puts their forgetting matrices and the difference side by side: the paper's
ablation of null-space projection (docs/brainstacks.md §5).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..io import atomic_write_bytes, atomic_write_json, load_tensors, read_json
from ..presets import Preset, preset_from_record, preset_record
from ..report.paper import PAPER_FORGETTING
from ..report.plots import plot_forgetting, plot_subspaces
from ..run import load_run, prepared_base
from ..stacks.store import load_all_stacks, load_stack, stack_paths
from ..stacks.manifest import content_key, new_manifest, read_manifest, write_manifest
from ..training.continual import check_domains, train_domains
from ..training.nullspace import collect_deltas, top_directions
from ..training.projection import orthogonality_by_projection, spectra_of, subspace_similarity
from .common import add_preset_args, add_quant_arg, domain_data, domain_val, preset_of, writable_folder
from .pretrain import ensure_base
from .rl import align_hooks, parse_rl, rl_lines, rl_summary

HELP = "continual domains in curriculum order, with null-space projection"

# The parts of the recorded Preset a resumed run must share with the one that started it: what the
# stacks already trained depend on. The router's and the evaluation's settings may change in between.
RESUME_KEYS = ("continual", "stack", "adapter", "boost", "quant", "data")


def run_continual(preset: Preset, out: str | Path, run: str | Path | None = None, progress: bool = True,
                  first_from: str | Path | None = None) -> dict:
    """Train every domain of `preset.continual` in order on the base in `out`; stacks and manifest in `run`
    (default: `out`). Returns the manifest (with the forgetting matrix).

    `first_from`: a finished run on the same base whose settings differ at most in `continual.nullspace`;
    its first domain's stacks are this run's (`share_first_domain`) instead of being trained again."""
    out = Path(out)
    run = Path(run) if run is not None else out
    cc = preset.continual
    check_domains(cc.domains)
    if cc.steps is not None:  # the continual run's own steps per round
        preset = replace(preset, stack=replace(preset.stack, steps=cc.steps))
    if cc.eval_every is not None:  # and its own validation cadence
        preset = replace(preset, stack=replace(preset.stack, eval_every=cc.eval_every))
    ensure_base(preset, out, progress)
    # the base as every stack of this run sees it: NF4 first if the preset says so, then wrapped
    model, tok = prepared_base(preset, out)
    config = preset_record(preset)  # the whole Preset: route and eval read the run's settings from here
    manifest = read_manifest(run)
    if manifest is None:
        # written before any training, so a kill in the first round still leaves a run that says what it is
        manifest = new_manifest(model, tok, list(cc.domains), config)
        manifest["done"] = []
        write_manifest(run, manifest)
    else:
        # resuming under other settings would mix stacks trained two ways in one run. The record is read back
        # through the Preset first, so that a field added since it was written compares at its default
        try:
            recorded = preset_record(preset_from_record(manifest["config"]))
        except ValueError:
            recorded = manifest["config"]
        keys = RESUME_KEYS + (("rl",) if cc.rl else ())  # RL's settings matter to a run that aligns stacks
        differ = [k for k in keys if recorded.get(k) != config[k]]
        if differ:
            raise ValueError(f"{run} holds a run with a different configuration ({', '.join(differ)}); use another "
                             "--out, or delete it")
    # the stacks already trained go back on the model, so the next round trains on top of them exactly
    # as it would have without the interruption (a damaged one: DamagedStacksError, naming the repair)
    load_all_stacks(run, model, manifest, strict=True)
    if first_from is not None:
        share_first_domain(Path(first_from), run, model, manifest)

    # every domain's data once, up front: the forgetting row after each domain evaluates all earlier ones
    data = {d: domain_data(preset, tok, d, preset.stack) for d in cc.domains}  # (PackedExamples, ExampleSet)
    # the null-space directions are measured on their own (usually larger) sample of validation examples,
    # the paper's n = 200 (docs/brainstacks.md §5), independent of how many the round's evaluations use
    ns_cfg = replace(preset.stack, max_val_examples=cc.ns_examples)
    ns_data = {d: domain_val(preset, tok, d, ns_cfg) for d in cc.domains} if cc.nullspace else {}
    manifest = train_domains(model, run, manifest, data, ns_data, cc, preset.stack, preset.adapter, preset.boost,
                             progress=progress, align=align_hooks(preset, tok, progress))
    if cc.rl:
        rl_summary(run, manifest)
    atomic_write_json(run / "forgetting.json", manifest["forgetting"])
    return manifest


def share_first_domain(source: Path, run: Path, model, manifest: dict) -> None:
    """Give `run` the first domain of `source` (a run on the same base, in the same order) as its own: its
    stacks, copied and loaded onto `model`, their manifest records and the first forgetting row.

    Exact for a run that differs from `source` only in null-space projection: the first domain has no
    earlier stack to keep out of, and every stack has its own seed (training/sft.py's stack_seed), so
    training it again gives the same tensors bit for bit (tests/test_continual.py checks it). Nothing
    happens when `run` has the domain already or `source` has not finished it."""
    domain = manifest["domains"][0]
    theirs = read_manifest(source)
    if domain in manifest["done"] or theirs is None or domain not in theirs.get("done", []):
        return
    mine, other = dict(manifest["config"]), dict(theirs["config"])
    mine["continual"] = {k: v for k, v in mine["continual"].items() if k != "nullspace"}
    other["continual"] = {k: v for k, v in other["continual"].items() if k != "nullspace"}
    if (mine != other or theirs["domains"] != manifest["domains"]
            or theirs["base_fingerprint"] != manifest["base_fingerprint"]):
        raise ValueError(f"{source} is not the same run as {run} but for null-space projection: "
                         "its first domain cannot be shared")
    if any(s["domain"] == domain for s in manifest["stacks"]):  # a round of it trained here already
        return
    records = [s for s in theirs["stacks"] if s["domain"] == domain]
    for record in records:  # files first, then the manifest names them (the store's order)
        for src, dst in zip(stack_paths(source, domain, record["round"]), stack_paths(run, domain, record["round"])):
            atomic_write_bytes(dst, src.read_bytes())
        load_stack(run, model, domain, record["round"])
    manifest["stacks"] += records
    manifest["forgetting"]["matrix"][0] = list(theirs["forgetting"]["matrix"][0])
    manifest["timings"][domain] = 0.0  # trained in `source`, which holds its time
    manifest.setdefault("shared", {})[domain] = str(source)
    manifest["done"].append(domain)
    write_manifest(run, manifest)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(1, len(values))


# -- what the figures show (the paper's Figures 8–10) ------------------------------------------------


def subspace_analysis(preset: Preset, out: str | Path, run: str | Path | None = None) -> dict:
    """Cross-domain similarity of the stacks' principal output subspaces, their singular-value spectra,
    and how orthogonal each later domain's stacks are to the directions they were kept out of."""
    run = Path(run) if run is not None else Path(out)
    sr = load_run(run, preset, router=False)  # the base beside the run (out), every stack, checked
    model, tok, manifest, preset = sr.model, sr.tok, sr.manifest, sr.preset
    domains = [d for d in manifest["domains"] if d in manifest.get("done", [])]
    cc = preset.continual
    ns_cfg = replace(preset.stack, max_val_examples=cc.ns_examples)
    data = {d: domain_val(preset, tok, d, ns_cfg) for d in domains}
    # each domain's own principal output directions (K per projection), with every stack finished: the
    # similarity panel compares how much two domains' stacks write into the same directions
    # one pass per domain serves both its directions and its spectrum;
    # the generator as domain_bases seeds it, so the bases are the ones domain_bases would give
    deltas = {d: collect_deltas(model, data[d], [d]) for d in domains}
    g = torch.Generator().manual_seed(0)
    bases = {d: top_directions(deltas[d], cc.ns_k, g) for d in domains}
    spectra = {d: spectra_of(deltas[d], cc.ns_k) for d in domains}
    # how little each later domain's stacks write into the directions it was kept out of (1 = nothing),
    # against the stored basis it trained with, per projection, averaged over the domains
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
    out = Path(out)
    cc = preset.continual
    # read first: a single run writes its own forgetting.json into `out` (its matrix alone) as it finishes
    previous = read_json(out / "forgetting.json") if (out / "forgetting.json").is_file() else {}
    if compare_nullspace:
        # the ablation: the same base, data and rounds, once without and once with the projection; each
        # stack gets the same seed in both runs (training/sft.py's stack_seed), so the difference of the
        # two matrices is the projection's effect, not a different draw
        runs, capacity, capacity_by_proj = {}, {}, {}
        # the first domain has nothing to be kept out of, so the run with the projection takes it from the
        # run without (the same stacks, bit for bit: share_first_domain)
        for name, ns in (("without null-space", False), ("with null-space", True)):
            folder = out / ("nullspace" if ns else "no_nullspace")
            manifest = run_continual(replace(preset, continual=replace(cc, nullspace=ns)), out, folder, progress,
                                     first_from=out / "no_nullspace" if ns else None)
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
    # the figures analyse the run with the projection when there are two: it is the one route and eval use.
    # Kept from the last call when that run's stacks and the settings it reads are the same (a pass over
    # every domain's examples per domain: on a pretrained base, most of a finished stage's second call)
    record = preset_record(preset)
    key = content_key(analysis_run, read_manifest(analysis_run), record["continual"], record["data"], record["stack"])
    reuse = previous.get("analysis_key") == key and "analysis" in previous
    result["analysis"] = previous["analysis"] if reuse else subspace_analysis(preset, out, analysis_run)
    result["analysis_key"] = key
    result["paper"] = PAPER_FORGETTING
    atomic_write_json(out / "forgetting.json", result)
    plot_forgetting(result["runs"], out / "forgetting.png")
    a = result["analysis"]
    plot_subspaces(a["similarity"], a["domains"], a["spectra"], a["orthogonality"], out / "subspaces.png")
    return result


def add_args(p) -> None:
    add_preset_args(p, "runs/demo")
    p.add_argument("--domains", help="comma-separated, in training order (default: chat,code,math,medical,reasoning)")
    p.add_argument("--no-nullspace", action="store_true", help="train without null-space projection")
    p.add_argument("--compare-nullspace", action="store_true",
                   help="train twice, with and without null-space, into DIR/nullspace and DIR/no_nullspace")
    p.add_argument("--ns-mode", choices=["strict", "reference"], default="strict",
                   help="strict (default): also project every expert's B after each step, so stored stacks are "
                        "orthogonal; reference: the released code (training-time projection only, leaks)")
    p.add_argument("--ns-basis", choices=["per_domain", "sum"], default="per_domain",
                   help="per_domain (paper): K directions per earlier domain; sum (released code): K of the sum")
    p.add_argument("--ns-data", choices=["previous", "new"], default="previous",
                   help="previous (paper): earlier domains' validation examples; new (released code): the new domain's")
    p.add_argument("--rl", metavar="DOMAIN=METHOD,...",
                   help="RL on each named domain's last stack before it is frozen, e.g. chat=dpo,math=grpo "
                        "(methods: dpo, grpo, reinforce; the preset's RLConfig)")
    add_quant_arg(p, None, "base precision (default: the preset's)")


def main(args) -> int:
    writable_folder(args.out)
    preset = preset_of(args)
    cc = preset.continual
    if args.domains:
        cc = replace(cc, domains=tuple(d.strip() for d in args.domains.split(",") if d.strip()))
    cc = replace(cc, nullspace=not args.no_nullspace, ns_mode=args.ns_mode, ns_basis=args.ns_basis, ns_data=args.ns_data,
                 rl=parse_rl(args.rl, cc.domains))
    result = train_stage(replace(preset, continual=cc), args.out, args.compare_nullspace, progress=not args.no_progress)
    for name, f in result["runs"].items():
        print(f"forgetting matrix, {name} (rows: after training; columns: {', '.join(f['domains'])}):")
        for d, row in zip(f["domains"], f["matrix"]):
            print(f"  after {d:10s} " + "  ".join("   -  " if v is None else f"{v:6.3f}" for v in row))
    out = Path(args.out)
    for runs in ([out / "no_nullspace", out / "nullspace"] if args.compare_nullspace else [out]):
        if (runs / "rl.json").is_file():
            for r in read_json(runs / "rl.json")["domains"].values():
                print("\n".join(rl_lines(r)))
    print(f"wrote {out / 'forgetting.json'}, {out / 'forgetting.png'}, {out / 'subspaces.png'}")
    return 0
