"""`eval --harness`: the run's benchmarks through lm-evaluation-harness, in base / ungated / routed mode.

    RUN/harness/tasks/      the local task files (evaluation/harness_tasks.py): a choice task per domain
                            from its test split, GSM-Symbolic from the math test split, HumanEval if asked
    RUN/harness.json        {task: {mode: {metric: {value, n, interval}}}}, and how many requests were cut
    RUN/harness.png         one bar per task × mode, with its 95% interval

The harness runs offline on these files (TaskManager(include_path=..., include_defaults=False)). With
`table4`, the paper's eight benchmarks run too, from the hub (limit 200, as the paper's samples), the
paper's numbers beside ours; where the hub cannot be reached that part says so and the rest stands.
The settings are the preset's EvalConfig.harness (presets.HarnessConfig); the result is cached under
the run's content and its whole EvalConfig (eval.json's key).
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

from ..data import load_split
from ..evaluation.harness import evaluate
from ..evaluation import harness_tasks
from ..evaluation.harness_tasks import HubUnavailable, write_tasks
from ..io import atomic_write_json, read_json
from ..presets import HarnessConfig, Preset
from ..report.plots import plot_harness
from ..run import load_run
from .common import eval_key

HARNESS_MODES = ("base", "ungated", "routed")  # the paper's comparison (Table 4: base vs routed)


def harness_stage(path: str | Path, preset: Preset | str | None = None, cfg: HarnessConfig | None = None,
                  table4: bool | None = None) -> dict:
    """Run the harness on the run at `path` in every HARNESS_MODES; write and return RUN/harness.json.
    `cfg`: the preset's EvalConfig.harness unless given; `table4`, if given, replaces its table4."""
    sr = load_run(path, preset)
    cfg = cfg or sr.preset.eval.harness
    if table4 is not None:
        cfg = replace(cfg, table4=table4)
    if sr.router is None:
        raise FileNotFoundError(f"no router in {sr.paths.run}: run `python -m ministacks route --run {path}` first")
    out = sr.paths.run / "harness.json"
    key = [eval_key(sr, sr.preset.eval), asdict(cfg)]  # a cfg given outright is not in the preset's
    cached = read_json(out) if out.is_file() else {}
    if cached.get("key") == key:
        return cached
    start = time.time()
    folder = sr.paths.run / "harness" / "tasks"
    ev = sr.preset.eval
    splits = {d: load_split(d, "test", sr.preset.data) for d in sr.domains}
    # the choice sets of eval's choice accuracy (the same examples, cut to the same length): acc_mean is
    # that measurement through the harness, and tests/test_cli.py checks the two agree
    names = write_tasks(folder, sr.tok, sr.preset.stack.seq_len, splits, n_choice=cfg.n_choice, n_gsm=cfg.n_gsm,
                        n_humaneval=cfg.n_humaneval, max_gen_toks=min(256, ev.max_new_tokens),
                        repetition_penalty=ev.repetition_penalty,
                        humaneval_repetition_penalty=ev.humaneval_repetition_penalty,
                        humaneval_timeout=ev.humaneval_timeout)
    result = {"key": key, "config": asdict(cfg), "modes": list(HARNESS_MODES), "tasks": names,
              "results": evaluate(sr, names, HARNESS_MODES, include_path=folder, score_eos=True)}
    if cfg.table4:
        try:
            result["table4"] = harness_tasks.table4(sr, modes=("base", "routed"))
        except HubUnavailable as e:
            result["table4_unavailable"] = str(e)
    result["seconds"] = time.time() - start
    result["files"] = {"json": str(out), "plot": str(sr.paths.run / "harness.png")}
    atomic_write_json(out, result)
    plot_harness(result, sr.paths.run / "harness.png")
    return result
