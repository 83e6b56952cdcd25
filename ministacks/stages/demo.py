"""`demo`: every stage in order on the embedded default data, then OUT/report.md.

    pretrain -> compare (Exp 1, on the 4-bit base) -> boost -> train twice (without and with null-space)
             -> route, eval and the harness's benchmarks on the null-space run
             -> RL after SFT: a chat -> reasoning run with DPO on chat and GRPO on reasoning (OUT/rl)
             -> PSN, short: v1 and v2 on chat -> code (OUT/psn/short) -> report.md

Each stage resumes from what the folder already holds, so running the demo again after a kill (or
after it finished) redoes nothing that is done. The same Preset goes to every stage: a modified
preset reaches the router and the evaluation too.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from ..io import atomic_write_json, read_json
from ..presets import Preset, get_preset, literal
from ..report.findings import findings_section
from ..report.evaluation import eval_section, harness_section
from ..report.report import boost_section, compare_section, data_section, forgetting_section, pretrain_section, write_report
from ..report.psn import psn_section
from ..report.rl import rl_section
from ..report.router import router_section
from .boost import run_boost
from .common import add_preset_args, writable_folder
from .compare import run_compare
from .continual import run_continual, train_stage
from .evaluate import eval_stage
from .harness_eval import harness_stage
from .pretrain import stage_pretrain
from .psn import psn_v1, psn_v2
from .rl import rl_summary
from .route import route_stage

HELP = "run every stage on the default data and write report.md"
STAGE_TIMES = "stage_times.json"  # OUT/stage_times.json: every invocation's seconds per stage, summed


def add_args(p) -> None:
    add_preset_args(p, "runs/demo")
    p.add_argument("--literal", action="store_true",
                   help="the paper's literal 4 x r16 stacks on a base pretrained on raw text only: the preset as it was "
                        "before it took the paper's proportions and a template-aware base (docs/brainstacks.md §9)")


def main(args) -> int:
    preset, out, progress = get_preset(args.preset), writable_folder(args.out), not args.no_progress
    if args.literal:
        preset = literal(preset)
    t0 = time.time()
    times: dict[str, float] = {}  # wall seconds of each stage in this invocation (a finished one: ~0)
    # every invocation's seconds per stage, summed: what the stages cost however many runs they took
    ledger_path = out / STAGE_TIMES
    ledger = read_json(ledger_path) if ledger_path.is_file() else {"invocations": 0, "seconds": {}}
    ledger["invocations"] += 1

    def timed(name: str, fn, *a, **k):
        start = time.time()
        result = fn(*a, **k)
        times[name] = time.time() - start
        ledger["seconds"][name] = ledger["seconds"].get(name, 0.0) + times[name]
        atomic_write_json(ledger_path, ledger)  # after every stage: a kill loses at most the stage in progress
        return result

    # each call returns at once with the stage's JSON when that stage already finished in `out`
    summary = timed("data, tokenizer, pretraining", stage_pretrain, preset, out, progress=progress)
    # Exp 1 is on the 4-bit base, as in the paper
    compare = timed("Exp 1: MoE-LoRA vs LoRA", run_compare, replace(preset, quant="nf4"), out, progress=progress)
    boost = timed("residual boosting", run_boost, preset, out, progress=progress)
    forgetting = timed("continual, without and with null-space", train_stage, preset, out, compare_nullspace=True,
                       progress=progress)
    run = out / "nullspace"  # the router and the evaluation work on the run with null-space projection
    # the demo's own Preset, not a name: route and eval check it against the run's record, then use it
    router = timed("meta-router", route_stage, run, preset, progress=progress)
    evaluation = timed("evaluation", eval_stage, run, preset, progress=progress)
    harness = timed("benchmarks through lm-evaluation-harness", harness_stage, run, preset)
    rl = timed("RL after SFT: DPO on chat, GRPO on reasoning", rl_demo_stage, preset, out, progress)
    psn = timed("PSN v1 and v2, short: chat -> code", psn_demo_stage, preset, out, progress)
    sections = [
        f"Preset `{preset.name}`; run folder `{out}`; {time.time() - t0:.0f} s for this invocation.\n",
        findings_section(compare, boost, forgetting, router, evaluation),
        data_section(summary["data"]),
        pretrain_section(summary),
        compare_section(compare),
        boost_section(boost),
        forgetting_section(forgetting),
        router_section(router, f"{run.name}/router.png"),
        eval_section(evaluation, f"{run.name}/eval.png"),
        harness_section(harness, f"{run.name}/harness.png"),
        rl_section(rl, f"{RL_RUN}/rl.png"),
        psn_section(psn),
        times_section(times, ledger),
    ]
    path = write_report(out, sections, title="ministacks demo report")
    print(f"\nvalidation loss {summary['val_loss']:.3f} (unigram entropy {summary['unigram_entropy']:.3f})")
    print(f"report: {path}")
    return 0


RL_RUN = "rl"  # OUT/rl: the demo's RL run
RL_DOMAINS = (("chat", "dpo"), ("reasoning", "grpo"))  # DPO where replies are judged by pairs, GRPO where checked


def rl_demo_stage(preset: Preset, out: Path, progress: bool) -> dict:
    """RL in the paper's place, on a short continual run of its own (OUT/rl): chat, then reasoning, one round each,
    each domain's stack aligned before it is frozen (`train --rl chat=dpo,reasoning=grpo`). Its own run, because
    aligning a stack of the null-space run would change what every later stack there was trained on.
    Chat's SFT stack is trained as the continual runs' first one is (the same seed, data and steps)."""
    cc = replace(preset.continual, domains=tuple(d for d, _ in RL_DOMAINS), rounds=1, rl=RL_DOMAINS)
    manifest = run_continual(replace(preset, continual=cc), out, out / RL_RUN, progress)
    return rl_summary(out / RL_RUN, manifest)


PSN_DOMAINS = ("chat", "code")  # the curriculum's first two: code's block is Figure 12's


def psn_demo_stage(preset: Preset, out: Path, progress: bool) -> dict:
    """PSN's two variants, short: on the curriculum's first two domains only, and v2's blocks over OUT's base
    (no second pretraining). `psn --variant v1|v2` runs them on every domain, v2 over a base pretrained on
    general text alone; run on this folder, they replace these results in psn.json and the report."""
    path = out / "psn.json"
    done = read_json(path) if path.is_file() else {}
    if "v1" in done and "v2" in done:  # finished before (or replaced by the full `psn` runs): nothing to redo
        return done
    short = out / "psn" / "short"
    psn_v1(preset, out, progress, domains=PSN_DOMAINS, folder=short / "random")
    psn_v2(preset, out, progress, domains=PSN_DOMAINS, folder=short / "v2", own_base=True)
    return read_json(out / "psn.json")


def times_section(times: dict[str, float], ledger: dict) -> str:
    """How long each stage took: in this invocation (a stage that had already finished shows its few seconds
    of reading) and over every invocation of the demo in this folder (OUT/stage_times.json), which for a
    run that was never interrupted is the same, and otherwise is what the stages cost in all."""
    n = ledger["invocations"]
    rows = [f"| {name} | {s:.0f} | {ledger['seconds'][name]:.0f} |" for name, s in times.items()]
    total = sum(ledger["seconds"][name] for name in times)
    return "\n".join(["## Stage times", "", f"| stage | seconds, this invocation | seconds, all {n} invocation(s) |",
                      "|---|---:|---:|", *rows, f"| **total** | **{sum(times.values()):.0f}** | **{total:.0f}** |", ""])
