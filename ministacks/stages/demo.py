"""`demo`: every stage in order on the embedded default data, then OUT/report.md.

    pretrain -> compare (Exp 1, on the 4-bit base) -> boost -> train twice (without and with null-space)
             -> route and eval on the null-space run -> report.md

Each stage resumes from what the folder already holds, so running the demo again after a kill (or
after it finished) redoes nothing that is done. The same Preset goes to every stage: a modified
preset reaches the router and the evaluation too.
"""

from __future__ import annotations

import time
from dataclasses import replace

from ..presets import get_preset
from ..report.findings import findings_section
from ..report.evaluation import eval_section
from ..report.report import boost_section, compare_section, data_section, forgetting_section, pretrain_section, write_report
from ..report.router import router_section
from .boost import run_boost
from .common import add_preset_args, writable_folder
from .compare import run_compare
from .continual import train_stage
from .evaluate import eval_stage
from .pretrain import stage_pretrain
from .route import route_stage

HELP = "run every stage on the default data and write report.md"


def add_args(p) -> None:
    add_preset_args(p, "runs/demo")


def main(args) -> int:
    preset, out, progress = get_preset(args.preset), writable_folder(args.out), not args.no_progress
    t0 = time.time()
    times: dict[str, float] = {}  # wall seconds of each stage in this invocation (a finished one: ~0)

    def timed(name: str, fn, *a, **k):
        start = time.time()
        result = fn(*a, **k)
        times[name] = time.time() - start
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
        times_section(times),
    ]
    path = write_report(out, sections, title="ministacks demo report")
    print(f"\nvalidation loss {summary['val_loss']:.3f} (unigram entropy {summary['unigram_entropy']:.3f})")
    print(f"report: {path}")
    return 0


def times_section(times: dict[str, float]) -> str:
    """How long each stage took in this invocation; a stage that had already finished shows its few
    seconds of reading, so a resumed demo's table is the time it took to resume, not the first run's."""
    rows = [f"| {name} | {s:.0f} |" for name, s in times.items()]
    return "\n".join(["## Stage times (this invocation)", "", "| stage | seconds |", "|---|---:|", *rows,
                      f"| **total** | **{sum(times.values()):.0f}** |", ""])
