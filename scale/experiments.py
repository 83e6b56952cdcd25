"""The paper's experiments as scripts, on pretrained bases: each a config holding the paper's values and one command.

    python -m scale.exp1 --out runs/exp1          Exp 1: MoE-LoRA vs the rank-64 LoRA (TinyLlama-1.1B, NF4)
    python -m scale.exp2 --out runs/exp2          Exp 2: 4 continual domains, forgetting with and without null-space
    python -m scale.exp3 --out runs/exp3          Exp 3: Gemma 3 12B IT, 5 domains x 2 rounds, router, evaluation
    python -m scale.cpu  --out runs/smollm2       the same on SmolLM2-135M-Instruct on a CPU, cut to ~40 minutes
    python -m scale.rl   --out runs/smollm2-rl    GRPO after SFT on SmolLM2-135M-Instruct (CPU): arithmetic

Every script is ministacks' own pipeline: the folder's base is a pretrained model (OUT/base/pretrained.json,
scale/model.py), and the stages are ministacks' compare, boost, train, route, eval and the harness, with their progress
bars, checkpoints and resume (run the same command again after a kill), writing the same files the demo
writes and a report.md whose findings table puts the paper's number beside ours (report/findings.py).
`--tiny` runs the same code path on a tiny random base built in the folder (scale/tiny.py), in seconds:
what the tests run for every script.

The settings are the paper's (docs/brainstacks.md §3, §9) where the paper states them:
  Exp 1   TinyLlama-1.1B in NF4; alpaca; 400 steps, lr 2e-4, batch 16, sequence 512, warm-up 40, validation
          every 50 steps on 200 examples; MoE-LoRA 4 x r16 top-2 against a single LoRA of rank 64; and residual
          boosting on chat (up to 3 rounds: round 2 best, round 3 worse)
  Exp 2   TinyLlama; chat -> code -> medical -> math, up to 3 rounds each; null-space n = 200, K = 32; the
          forgetting matrices without and with the projection
  Exp 3   Gemma 3 12B IT in NF4; 5 domains x 2 rounds of 500 steps at lr 1e-4; null-space n = 400, K = 64; the
          meta-router; the evaluation (base / ungated / routed), and Table 4's eight benchmarks through
          lm-evaluation-harness (limit 200 each)
What the paper leaves open is ministacks' default (presets.QUICK's router and evaluation settings).

Data: the paper's data sets by hub id (scale/data.py). Where the hub cannot be reached they cannot be had, and
the script says so and falls back to ministacks' embedded corpora; the report says which data it ran on.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ministacks.data import DataConfig
from ministacks.io import atomic_write_json, read_json
from ministacks.presets import QUICK, SMOKE, EvalConfig, HarnessConfig, Preset
from ministacks.report.evaluation import eval_section, harness_section
from ministacks.report.findings import findings_section
from ministacks.report.rl import rl_section
from ministacks.report.report import boost_section, compare_section, forgetting_section, write_report
from ministacks.report.router import router_section
from ministacks.rl.loop import RLConfig
from ministacks.routing.router import RouterConfig
from ministacks.stacks.layer import AdapterConfig
from ministacks.stages.common import writable_folder
from ministacks.training.continual import ContinualConfig
from ministacks.training.sft import BoostConfig, StackTrainConfig

STAGES = ("compare", "boost", "continual", "route", "eval", "harness", "rl")
LITERAL = AdapterConfig()  # the paper's 4 experts x rank 16, top-2, rsLoRA; the LoRA baseline rank 64


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    base: str  # the paper's base, a hub id (or, for the CPU run, "smollm2": the wheel's, converted once)
    preset: Preset  # every setting of the stages, the paper's values where it states them
    stages: tuple[str, ...]  # which of STAGES run, in that order
    data: str  # the paper's data sets for it (scale/data.py): "tinyllama" or "gemma"; "": the embedded corpora
    max_seq_len: int  # the context the run uses
    compare_nullspace: bool = False  # continual twice, without and with null-space (the forgetting ablation)
    gpu: bool = True  # written for a GPU; on a CPU it says so before starting


def _paper_preset(name: str, steps: int, lr: float, seq_len: int, domains: tuple[str, ...], rounds: int,
                  ns_k: int, ns_examples: int, max_example_chars: int) -> Preset:
    return replace(
        QUICK, name=name, quant="nf4", adapter=LITERAL,
        # the paper cut responses at 2000 characters; a whole example may fill the sequence (~4 characters a token)
        data=DataConfig(max_examples=20000, n_val=200, n_test=200, max_example_chars=max_example_chars),
        stack=StackTrainConfig(steps=steps, batch_size=16, seq_len=seq_len, lr=lr, warmup_steps=40, eval_every=50,
                               max_val_examples=200, eval_batch_size=8),
        boost=BoostConfig(max_rounds=rounds),
        continual=ContinualConfig(domains=domains, rounds=rounds, ns_k=ns_k, ns_examples=ns_examples),
        router=RouterConfig(prompts_per_domain=200, mixed_per_kind=60),
        eval=EvalConfig(n_loss=200, n_exact=200, n_generate=20),
    )


EXP1 = Experiment(
    "exp1", "Experiment 1: MoE-LoRA vs the parameter-matched single LoRA, and residual boosting (TinyLlama-1.1B)",
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    _paper_preset("exp1", 400, 2e-4, 512, ("chat",), 3, 32, 200, 2400), ("compare", "boost"), "tinyllama", 2048)
EXP2 = Experiment(
    "exp2", "Experiment 2: continual domains with and without null-space projection (TinyLlama-1.1B)",
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    _paper_preset("exp2", 400, 2e-4, 512, ("chat", "code", "medical", "math"), 3, 32, 200, 2400), ("continual",),
    "tinyllama", 2048, compare_nullspace=True)
_EXP3 = _paper_preset("exp3", 500, 1e-4, 512, ("chat", "code", "math", "medical", "reasoning"), 2, 64, 400, 2400)
EXP3 = Experiment(
    "exp3", "Experiment 3: five domains, the meta-router and the evaluation (Gemma 3 12B IT)", "google/gemma-3-12b-it",
    # the harness stage runs the paper's Table 4 too (eight benchmarks from the hub, limit 200 each, base and routed)
    replace(_EXP3, eval=replace(_EXP3.eval, harness=HarnessConfig(table4=True))),
    ("continual", "route", "eval", "harness"), "gemma", 4096)

# SmolLM2-135M-Instruct on 2 CPU cores, about 40 minutes: Exp 1 at 32 steps, and a three-domain Exp 2 (one round
# each, with and without null-space) with the router and the evaluation. The three are chat, math and medical
# in curriculum order, not Exp 2's first three (chat, code, medical): the oracle's finding (medical prompts are
# best served by chat+math) needs a math stack.
# What is cut, against the paper: steps (32 and 24, not 400), batch 4 x 128 tokens (16 x 512; ~5-6 s a step at
# 4 x 128 here), validation on 32 examples (200), null-space n = 64 (200), the evaluation's sample sizes. A first
# run at 40 and 32 steps with larger evaluation sets took 65 minutes (compare 724 s, continual 1993 s, router
# 145 s, eval 1042 s, partly on shared cores): the cuts below are what brings it near 40.
CPU = Experiment(
    "cpu", "The paper's experiments on SmolLM2-135M-Instruct (NF4, CPU), cut to about 40 minutes", "smollm2",
    replace(_paper_preset("cpu", 32, 2e-4, 128, ("chat", "math", "medical"), 1, 32, 64, 1200),
            stack=StackTrainConfig(steps=32, batch_size=4, seq_len=128, lr=2e-4, warmup_steps=5, eval_every=8,
                                   max_val_examples=32, eval_batch_size=8),
            continual=ContinualConfig(domains=("chat", "math", "medical"), rounds=1, steps=24, eval_every=8,
                                      ns_k=32, ns_examples=64),
            router=RouterConfig(prompts_per_domain=16, mixed_per_kind=14, epochs=40),
            # `eval --harness` on the run: 20 choice examples per domain (four candidates each) and 5 GSM-Symbolic
            # problems in each of base / ungated / routed, against the defaults' 100 and 20: a CPU-sized check
            eval=EvalConfig(n_loss=50, n_exact=30, n_choice=50, n_general=40, n_generate=2, max_new_tokens=64,
                            n_panel_mixed=1, humaneval=8, harness=HarnessConfig(n_choice=20, n_gsm=5))),
    ("compare", "continual", "route", "eval", "harness"), "tinyllama", 2048, compare_nullspace=True, gpu=False)

# GRPO on real SmolLM2-135M-Instruct (NF4, CPU), on a task where its reward can be earned. Measured once each:
# on the math domain as the CPU run has it (word problems and signed arithmetic, 16 SFT steps) SmolLM2 answered
# 8% of the validation arithmetic right greedily, and 5 of 6 GRPO steps had no group with any reward variance;
# on signed arithmetic alone after 48 SFT steps, 0 of 40 (it answers "9 - 58 = 1"), 7 of 10 steps without
# variance; on unsigned sums after those 48 steps, 7 of 24 right. So here the math domain is unsigned addition
# of one- and two-digit numbers ("Calculate 13 + 92.", DataConfig.arithmetic_ops / arithmetic_signed), 48 SFT
# steps (its format "a + b = c\n#### c"), then 10 GRPO steps of 4 prompts x 8 samples at about a third of SFT's
# learning rate, as the miniature's RL (rl/loop.py). A GRPO step is ~40-60 s here; the measure is the greedy
# accuracy on 40 validation prompts; about 12 minutes in all.
RL = Experiment(
    "rl", "GRPO after SFT on SmolLM2-135M-Instruct (NF4, CPU): two-number sums", "smollm2",
    replace(CPU.preset, name="rl", data=replace(CPU.preset.data, max_examples=2000, arithmetic_share=1.0,
                                                arithmetic_ops="+", arithmetic_signed=False),
            continual=ContinualConfig(domains=("math",), rounds=1, steps=48, eval_every=16, nullspace=False,
                                      rl=(("math", "grpo"),)),
            rl=RLConfig(steps=10, lr=7e-5, prompts_per_step=4, group=8, max_new_tokens=32, n_eval=40, eval_every=5,
                        ckpt_every=1)),
    ("rl",), "", 2048, gpu=False)

EXPERIMENTS = {e.name: e for e in (EXP1, EXP2, EXP3, CPU, RL)}


def tiny(exp: Experiment) -> Experiment:
    """The same experiment on the smoke preset's sizes, for a tiny random base: seconds, the same code path."""
    # three domains (the oracle's finding needs chat, math and medical where the experiment has them), one round each
    cc = replace(SMOKE.continual, domains=exp.preset.continual.domains[:3], rounds=1, rl=exp.preset.continual.rl)
    # 8 steps a round (the smoke preset's 12 would add a minute to the test suite over the four scripts)
    stack = replace(SMOKE.stack, steps=8, warmup_steps=2, eval_every=4)
    preset = replace(SMOKE, name=f"{exp.name}-tiny", quant="nf4", continual=cc, stack=stack,
                     eval=replace(SMOKE.eval, humaneval=0))
    return replace(exp, preset=preset, max_seq_len=256, gpu=False)


def resolve_base(exp: Experiment, out: Path, base: str | None, tiny_base: bool) -> str:
    """The base this run uses: --base if given, a tiny random one with --tiny, SmolLM2 from its wheel, or the
    paper's hub id (load_base says clearly when the hub cannot be reached)."""
    if base is not None:
        return base
    if tiny_base:
        from .tiny import tiny_base as build

        return str(build(out / "tiny_base", data=exp.preset.data))
    if exp.base == "smollm2":
        from .smollm2 import smollm2_checkpoint

        return str(smollm2_checkpoint())
    return exp.base


def run_experiment(exp: Experiment, out: str | Path, base: str | None = None, tiny_base: bool = False,
                   progress: bool = True) -> Path:
    """Run `exp` into `out` (resuming what is there); write OUT/experiment.json and OUT/report.md; return its path."""
    from ministacks.stages.boost import run_boost
    from ministacks.stages.compare import run_compare
    from ministacks.stages.continual import run_continual, train_stage
    from ministacks.stages.evaluate import eval_stage
    from ministacks.stages.harness_eval import harness_stage
    from ministacks.stages.rl import rl_summary
    from ministacks.stages.route import route_stage

    from .data import paper_data
    from .model import config_parameter_count, write_pretrained

    out = writable_folder(out)
    if tiny_base:
        exp = tiny(exp)
    source = resolve_base(exp, out, base, tiny_base)
    if exp.data:
        data, data_note = paper_data(exp.data, exp.preset.continual.domains, exp.preset.data, tiny_base)
    else:
        data, data_note = exp.preset.data, "ministacks' embedded corpora (this experiment asks the hub for none)."
    preset = replace(exp.preset, data=data)
    write_pretrained(out, source, exp.max_seq_len)
    base_params = config_parameter_count(source)
    times_path = out / "stage_times.json"
    times = read_json(times_path) if times_path.is_file() else {}
    results: dict = {}

    def timed(name: str, fn, *a, **k):
        start = time.time()
        results[name] = fn(*a, **k)
        times[name] = times.get(name, 0.0) + time.time() - start
        atomic_write_json(times_path, times)

    run = out / "nullspace" if exp.compare_nullspace else out
    for stage in exp.stages:
        if stage == "compare":
            timed(stage, run_compare, preset, out, progress=progress)
        elif stage == "boost":
            timed(stage, run_boost, preset, out, progress=progress)
        elif stage == "continual":
            timed(stage, train_stage, preset, out, compare_nullspace=exp.compare_nullspace, progress=progress)
        elif stage == "route":
            timed(stage, route_stage, run, preset, progress=progress)
        elif stage == "eval":
            timed(stage, eval_stage, run, preset, progress=progress)
        elif stage == "harness":  # lm-evaluation-harness on the run: local tasks, and Table 4 where the preset asks
            timed(stage, harness_stage, run, preset)
        elif stage == "rl":  # SFT, then RL on each domain of continual.rl before it is frozen, in OUT/rl
            timed(stage, lambda: rl_summary(out / "rl", run_continual(preset, out, out / "rl", progress)))
        else:
            raise ValueError(f"unknown stage {stage!r}; the stages are {STAGES}")
    summary = {"experiment": exp.name, "title": exp.title, "base": source, "base_params": base_params,
               "data": data_note, "stages": list(exp.stages), "seconds": times}
    atomic_write_json(out / "experiment.json", summary)
    return write_report(out, report_sections(exp, summary, results, run, out), title=exp.title)


def report_sections(exp: Experiment, summary: dict, results: dict, run: Path, out: Path) -> list[str]:
    """The demo's sections for the stages that ran, after what this run is and what data it read."""
    c, b, f, r, e, h, rl = (results.get(s) for s in STAGES)
    head = [f"Base `{summary['base']}` ({summary['base_params'] / 1e6:.1f}M parameters), loaded in "
            f"{exp.preset.quant.upper()}; stages: {', '.join(exp.stages)}; run folder `{out}`.", "",
            f"Data: {summary['data']}", ""]
    sections = ["\n".join(head)]
    if any(x is not None for x in (c, b, f, r, e)):  # the paper's findings: none of them is RL's
        sections.append(findings_section(c, b, f, r, e))
    if c is not None:
        sections.append(compare_section(c))
    if b is not None:
        sections.append(boost_section(b))
    if f is not None:
        sections.append(forgetting_section(f))
    figures = f"{run.relative_to(out)}/" if run != out else ""  # the run's figures, from report.md in `out`
    if r is not None:
        sections.append(router_section(r, figures + "router.png"))
    if e is not None:
        sections.append(eval_section(e, figures + "eval.png"))
    if h is not None:
        sections.append(harness_section(h, figures + "harness.png"))
    if rl is not None:
        sections.append(rl_section(rl, "rl/rl.png"))
    rows = [f"| {name} | {s:.0f} |" for name, s in summary["seconds"].items()]
    sections.append("\n".join(["## Stage times", "", "| stage | seconds (all invocations) |", "|---|---:|", *rows,
                               f"| **total** | **{sum(summary['seconds'].values()):.0f}** |", ""]))
    return sections


def main(name: str, argv: list[str] | None = None) -> int:
    exp = EXPERIMENTS[name]
    p = argparse.ArgumentParser(prog=f"python -m scale.{name}", description=exp.title)
    p.add_argument("--out", default=f"runs/{name}", help=f"run folder (default: runs/{name}); resumes if it holds a run")
    p.add_argument("--base", default=None, help=f"a hub id or a local folder instead of {exp.base}")
    p.add_argument("--tiny", action="store_true", help="a tiny random base and the smoke sizes: the code path in seconds")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    import torch

    if exp.gpu and not args.tiny and not torch.cuda.is_available():
        print(f"note: {name} is written for a GPU (the paper's base and sizes); on this CPU it runs, very slowly. "
              "`python -m scale.cpu` is the CPU-sized run, `--tiny` the code path in seconds")
    path = run_experiment(exp, args.out, base=args.base, tiny_base=args.tiny, progress=not args.no_progress)
    print(f"report: {path}")
    return 0
