"""`rl`: DPO or GRPO on a trained run's last-trained domain; and the hooks `train --rl` runs in its loop.

    train --rl chat=dpo,math=grpo    each named domain's last stack is aligned after its SFT rounds and
                                     before it is frozen and the next domain starts (the paper's place,
                                     Algorithm 2 line 4): training/continual.py calls `align_hooks`'s
    rl --run DIR --domain D --method M
                                     the same for a finished run whose last-trained domain is D: its
                                     last stack is made active again (stacks.layer.thaw_last), aligned,
                                     frozen and saved in place. Only the last-trained domain: every later
                                     stack was trained on top of an earlier one, and would no longer
                                     match the stack it was trained on

Both write the RL result (rl/loop.py: config, curves, before and after, the guard's verdict) into the
stack's record and the manifest, and RUN/rl.json (every aligned domain) with RUN/rl.png beside them.
The run's eval.json and the router's oracle cache are keyed by the stacks' content, so `eval` and `route`
afterwards measure the aligned stack, never the old numbers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..data import load_split
from ..io import atomic_write_json
from ..presets import Preset
from ..report.rl import plot_rl
from ..rl.loop import METHODS, align_stack
from ..rl.rewards import REWARDS
from ..run import load_run, locate_run
from ..stacks.layer import StacksOn, freeze_active, set_stacks, thaw_last
from ..stacks.manifest import write_manifest
from ..stacks.store import read_record, save_stack
from ..training.continual import RL_IN_PROGRESS, load_basis
from ..training.examples import example_loss
from ..training.projection import attach_projection, detach_projection, make_after_step
from .common import add_run_args, domain_val, writable_folder

HELP = "DPO or GRPO on the last stack of a run's last-trained domain"


def parse_rl(text: str | None, domains) -> tuple[tuple[str, str], ...]:
    """`chat=dpo,math=grpo` -> (("chat", "dpo"), ("math", "grpo")), checked against the run's domains."""
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        domain, sep, method = item.strip().partition("=")
        if not sep or not domain or not method:
            raise ValueError(f"--rl takes domain=method pairs (e.g. chat=dpo,math=grpo), not {item!r}")
        check_method(domain, method, domains)
        pairs.append((domain, method))
    return tuple(pairs)


def check_method(domain: str, method: str, domains) -> None:
    if domain not in domains:
        raise ValueError(f"--rl names {domain!r}, which this run does not train ({', '.join(domains)})")
    if method not in METHODS:
        raise ValueError(f"unknown RL method {method!r} for {domain}: use one of {', '.join(METHODS)}")
    if method != "dpo" and domain not in REWARDS:
        raise ValueError(f"{method} needs a checkable reward and {domain} has none (rewards: {', '.join(REWARDS)}): "
                         f"use {domain}=dpo")


def _align(preset: Preset, tok, domain: str, method: str, model, ckpt_dir: Path, owner: dict, seed: int,
           after_step, progress: bool) -> dict:
    """align_stack on `domain`'s training and validation examples, its validation loss as SFT measures it."""
    val = domain_val(preset, tok, domain, preset.stack)
    return align_stack(model, tok, domain, method, load_split(domain, "train", preset.data),
                       load_split(domain, "val", preset.data), lambda: example_loss(model, val), preset.rl,
                       seed=seed, ckpt_dir=ckpt_dir, owner=owner, progress=progress, after_step=after_step)


def align_hooks(preset: Preset, tok, progress: bool) -> dict:
    """training/continual.py's `align` argument for `preset.continual.rl`: one Align per named domain."""
    def hook(domain: str, method: str):
        return lambda model, ckpt_dir, res, owner, after_step: _align(
            preset, tok, domain, method, model, ckpt_dir, owner, res.seed, after_step, progress)
    return {domain: hook(domain, method) for domain, method in preset.continual.rl}


def rl_summary(run: Path, manifest: dict) -> dict:
    """RUN/rl.json: every aligned stack's RL result, by domain; and RUN/rl.png."""
    results = {s["domain"]: s["rl"] for s in manifest["stacks"] if s.get("rl")}
    summary = {"run": str(run), "domains": results, "files": {"json": str(run / "rl.json"), "plot": str(run / "rl.png")}}
    atomic_write_json(run / "rl.json", summary)
    if results:
        plot_rl(results, run / "rl.png")
    return summary


def rl_stage(path: str | Path, domain: str, method: str, preset: Preset | str | None = None,
             progress: bool = True) -> dict:
    """RL on the last stack of the run's last-trained domain (module docstring); returns its result."""
    sr = load_run(path, preset, router=False)
    run, manifest, model = sr.paths.run, sr.manifest, sr.model
    check_method(domain, method, manifest["domains"])
    last = manifest["stacks"][-1] if manifest["stacks"] else None
    if last is None or last["domain"] != domain or domain not in manifest.get("done", []):
        trained = last["domain"] if last else "none"
        raise ValueError(f"rl aligns the last-trained domain of a finished run ({trained} in {run}), not {domain}: "
                         f"every stack after {domain}'s was trained on top of it. Align it in training instead: "
                         f"train --rl {domain}={method}")
    if last.get("rl"):
        done = last["rl"]
        if done["method"] == method:
            return done  # this run is aligned already
        raise ValueError(f"{domain}'s last stack in {run} is aligned with {done['method']} already; "
                         f"to align it with {method}, retrain it first (python -m ministacks repair ...)")
    stored = read_record(run, domain, last["round"])["meta"]
    if stored.get("rl", {}).get("method") == method:  # killed after the stack was saved, before the manifest
        result = stored["rl"]
    else:
        thaw_last(model, domain)  # the frozen last stack becomes the active one again
        set_stacks(model, StacksOn.ungated())  # as the continual run trains: every frozen stack on
        cc, after_step = sr.preset.continual, None
        if (run / "bases" / f"{domain}.safetensors").is_file():  # trained with null-space projection: so is RL
            basis = load_basis(run, domain)
            attach_projection(model, basis, training_only=cc.ns_mode == "reference")
            after_step = make_after_step(basis, cc.ns_mode)
        owner = {"domain": domain, "round": last["round"]}
        result = _align(sr.preset, sr.tok, domain, method, model, run / RL_IN_PROGRESS, owner, last["seed"],
                        after_step, progress)
        detach_projection(model)
        freeze_active(model, domain)
        save_stack(run, model, domain, last["round"], "moe", sr.preset.adapter, meta={**stored, "rl": result})
    last["rl"] = result
    write_manifest(run, manifest)
    shutil.rmtree(run / RL_IN_PROGRESS, ignore_errors=True)
    rl_summary(run, manifest)
    return result


def rl_lines(result: dict) -> list[str]:
    """Before and after, as the command prints them."""
    b, a = result["before"], result["after"]
    lines = [f"{result['domain']} {result['method']}: {result['steps_run']} steps, {b['measure']} "
             f"{b['accuracy']:.1%} -> {a['accuracy']:.1%} (n={a['n']}, 95% interval {a['ci95'][0]:.1%}-{a['ci95'][1]:.1%}),"
             f" validation loss {b['val_loss']:.4f} -> {a['val_loss']:.4f}"]
    if result["guard"]:
        lines.append(f"guard: step {result['guard']['step']}: {result['guard']['reason']}; {result['guard']['restored']} "
                     "restored")
    return lines


def add_args(p) -> None:
    add_run_args(p)
    p.add_argument("--domain", required=True, help="the run's last-trained domain")
    p.add_argument("--method", required=True, choices=list(METHODS), help="dpo (pairs) or grpo / reinforce (rewards)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def main(args) -> int:
    if Path(args.run).is_dir():
        writable_folder(args.run, "--run")
    result = rl_stage(args.run, args.domain, args.method, args.preset, progress=not args.no_progress)
    print("\n".join(rl_lines(result)))
    run = locate_run(args.run).run
    print(f"wrote {run / 'rl.json'} and {run / 'rl.png'}")
    return 0
