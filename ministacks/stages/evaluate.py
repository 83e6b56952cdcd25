"""`eval`: what routing buys — base, ungated, routed and switched, per domain (the paper's Table 4 and §5.3).

For each mode (inference.MODES: base, ungated, routed with the paper's p-weighted rule, switched with the
routed domains at weight 1) and each domain, on the domain's *test* split (never seen by the stacks, the
router or the epoch selection):

    loss       the validation loss as everywhere else (train.example_loss's definition), token-weighted
               over the first `n_loss` test examples; the routed modes route every example on its own
    exact      the share of the first `n_exact` test examples with a checkable answer (math, reasoning, the
               ICD half of medical) whose greedy answer (repetition penalty 1.2, as the paper) is exactly the
               reference response — computed by teacher forcing, one forward per example instead of one per
               token (evaluation/forced.py: the same verdict as generating), so n can be in the hundreds.
               `by_source` splits it by generator (math: arithmetic and word problems)
    choice     every domain, chat and code too: of the first `n_choice` test examples, the share whose
               reference response has a higher mean log-prob per token than each of 3 responses to other
               test prompts of its kind (evaluation/choice.py; chance 25%): the accuracy that can differ
               between modes where every greedy answer is wrong; `correct_sum` by the summed log-prob
    accuracy   greedy answers *generated* for the first `n_generate` test examples, scored by tasks.score:
               math the "####" number, reasoning the final answer, medical the ICD code or a definition's
               word overlap; chat has nothing checkable. Fewer than `exact`'s (generation is the slow part),
               but the domain's own answer check, which accepts any working that ends in the right answer.
               Code: HumanEval pass@1 (humaneval.py) on the first `humaneval` problems — the stdlib
               test split has no unit tests, so it cannot say whether a function works
    humaneval  code only: pass_at_1, its 95% Wilson interval (ci95_low, ci95_high), passed, n (problems
               in the run) and n_fit (problems asked; one whose prompt leaves no room to answer counts
               as a failure), passed_ids, seconds; `accuracy` repeats pass_at_1 and `n_generated` is n.
               The routed modes route every problem from its raw text (instruction + docstring)
    format_ok  code only: the share of the `n_generate` stdlib test generations that pass the FORMAT
               CHECK (they parse and define the requested name and parameters; tasks.check_code_format,
               never called), over n_format_checked generations. Not accuracy: `return 42` passes it

and, in every mode, the loss on general held-out prose (data.general_text's test documents: text that is
no domain's, the miniature's analogue of the paper's general benchmarks), each document routed on its own
text in the routed modes, with the paired 95% interval of each mode's difference from the base. Plus
the routes taken (mean weight and the share of each switched-on set, per domain) and, for a fixed set of
prompts (one test prompt per domain and a few mixed-domain ones), every mode's answer side by side —
the paper's three-panel comparison, with the fourth mode beside it.

Results are written to RUN/eval.json after every (mode, domain) block, so a killed evaluation resumes
where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from ..data import general_text, load_split, mixed_prompts, raw_prompt, render_alpaca
from ..evaluation import humaneval
from ..evaluation.choice import choice_accuracy, choice_sets
from ..evaluation.modes import (ROUTED_MODES, Weights, exact_accuracy, mean_loss, mode_weights, paired_difference,
                                route_summary, text_losses)
from ..evaluation.tasks import score
from ..inference.stacked import MODES, StackedRun, describe_weights
from ..io import atomic_write_json, read_json
from ..presets import EvalConfig, Preset
from ..report.paper import PAPER_TABLE4
from ..report.plots import plot_eval
from ..report.evaluation import eval_table
from ..run import load_run
from .common import add_run_args, eval_key, writable_folder

HELP = "base / ungated / routed / switched: test loss and task accuracy per domain, loss on general text"


def eval_stage(path: str | Path, preset: Preset | str | None = None, progress: bool = True,
               cfg: EvalConfig | None = None) -> dict:
    """Evaluate the run at `path` in every mode; write and return RUN/eval.json.

    The run's own Preset is used (run.run_preset), with `preset`'s evaluation settings if one is given;
    `cfg` replaces the EvalConfig outright."""
    sr = load_run(path, preset)
    if sr.router is None:  # the routed modes need it, and eval.json always holds every mode
        raise FileNotFoundError(f"no router in {sr.paths.run}: run `python -m ministacks route --run {path}` first")
    cfg = cfg or sr.preset.eval
    out = sr.paths.run / "eval.json"
    key = eval_key(sr, cfg)
    # the same key: a killed evaluation's finished blocks are kept and only the rest run
    result = read_json(out) if out.is_file() else {}
    if result.get("key") != key:
        result = {"key": key, "domains": list(sr.domains), "modes": list(MODES), "config": asdict(cfg),
                  "results": {}, "routes": {}, "general": {}, "samples": [], "paper_table4": PAPER_TABLE4,
                  "seconds": {}, "files": {"json": str(out), "plot": str(sr.paths.run / "eval.png")}}
    todo = [(m, d) for d in sr.domains for m in MODES if f"{m}/{d}" not in result["results"]]
    todo += [(m, None) for m in MODES if m not in result["general"]]  # None: the general held-out text
    bar = tqdm(todo, desc="eval", disable=not progress, leave=False)
    for mode, domain in bar:
        bar.set_postfix_str(f"{domain or 'general text'} {mode}")
        t0 = time.time()
        if domain is None:
            result["general"][mode] = _general(sr, mode, cfg)
            if mode != "base" and "base" in result["general"]:
                result["general"][mode]["vs_base"] = paired_difference(result["general"]["base"], result["general"][mode])
        else:
            result["results"][f"{mode}/{domain}"] = _block(sr, mode, domain, cfg, result["routes"])
        result["seconds"][f"{mode}/{domain or 'general'}"] = time.time() - t0
        # Written after every block: a block is many generations (and HumanEval's test runs), so a kill
        # costs at most the block in progress, and the rerun resumes at the next one (todo, above).
        atomic_write_json(out, result)
    bar.close()
    if not result["samples"]:  # empty in a fresh result: the side-by-side panel is made once per key
        result["samples"] = side_by_side(sr, cfg)
        atomic_write_json(out, result)
    plot_eval(result, sr.paths.run / "eval.png")
    return result


def _block(sr: StackedRun, mode: str, domain: str, cfg: EvalConfig, routes: dict) -> dict:
    """One domain in one mode: the test loss, the exact greedy accuracy and the generated answers' accuracy."""
    # The test split: the stacks trained on train, the guard, the router's prompts and its epoch
    # selection read val, so these are the only examples nothing in the run was fitted or chosen on.
    test = load_split(domain, "test", sr.preset.data)
    # the first n of a fixed order: every mode is measured on the same examples; the exact check needs
    # an answer to check (medical: the ICD half; HPO definitions have none)
    checkable = [i for i, ex in enumerate(test) if ex.answer is not None][: cfg.n_exact]
    seq_len = sr.preset.stack.seq_len
    choices = choice_sets(sr.tok, test, seq_len, cfg.n_choice)  # every domain: a true response against others
    used = max([cfg.n_loss, cfg.n_generate] + [i + 1 for i in checkable] + [i + 1 for i, _ in choices])
    # The routed modes route every example on its own, from its raw text, as at inference: weights[i]
    # serves example i for the loss, the exact check and the generated answer alike.
    weights = mode_weights(sr, mode, [raw_prompt(ex) for ex in test[:used]])
    if mode == "routed":
        routes[domain] = route_summary(sr.domains, weights.per_prompt[: cfg.n_loss])
    loss_set = test[: cfg.n_loss]
    entry = {"loss": mean_loss(sr, loss_set, sr.preset.stack, weights.take(range(len(loss_set)))),
             "n_loss": len(loss_set)}
    if checkable:
        entry["exact"] = exact_accuracy(sr, [test[i] for i in checkable], weights.take(checkable),
                                        cfg.repetition_penalty)
    if choices:
        entry["choice"] = choice_accuracy(sr.model, sr.tok, test, choices, weights.take([i for i, _ in choices]),
                                          seq_len, sr.preset.stack.eval_batch_size)
    entry.update(_accuracy(sr, domain, test[: cfg.n_generate], mode, weights, cfg))
    return entry


def _general(sr: StackedRun, mode: str, cfg: EvalConfig) -> dict:
    """The loss of general held-out prose in `mode`, each document routed on its own text in the routed modes."""
    docs = general_text(sr.preset.data, "test")[: cfg.n_general]
    weights = mode_weights(sr, mode, docs)
    return text_losses(sr, docs, weights, sr.model.cfg.max_seq_len, sr.preset.stack.eval_batch_size)


def fits(sr: StackedRun, prompt: str, room: int) -> bool:
    """Does `prompt` leave at least `room` tokens of the model's context to answer in?

    It depends on the prompt and the model only, so every mode skips the same prompts."""
    return len(sr.tok.encode(prompt, bos=True)) + room <= sr.model.cfg.max_seq_len


def _scores(sr: StackedRun, domain: str, examples: list, weights: Weights, cfg: EvalConfig) -> list[dict]:
    """tasks.score of a greedy answer to every example whose prompt leaves room to answer in the context."""
    if not examples:
        return []
    # room for an answer as long as the longest reference (+ 8), rather than max_new_tokens on every
    # prompt, which would spend its time generating past the length of any reference answer
    budget = min(cfg.max_new_tokens, max(len(sr.tok.encode(ex.response)) for ex in examples) + 8)
    scores = []
    for i, ex in enumerate(examples):
        # A prompt that leaves no room to answer is not asked: its answer would be cut off by the context,
        # not by the model, and scoring it would count the context limit as a wrong answer. It is left out
        # of n_generated, in every mode alike (fits depends on the prompt alone).
        if not fits(sr, ex.prompt(), 8):
            continue
        # the weights are given, not recomputed; the model sees the templated prompt, greedy with the
        # paper's repetition penalty (docs/brainstacks.md §7)
        gen = sr.generate(raw_prompt(ex), weights.of(i), max_new_tokens=budget, prompt=ex.prompt(),
                          repetition_penalty=cfg.repetition_penalty)
        scores.append(score(domain, ex, gen["completion"], code_timeout=cfg.code_timeout))
    return scores


def _accuracy(sr: StackedRun, domain: str, examples: list, mode: str, weights: Weights, cfg: EvalConfig) -> dict:
    """The domain's checked accuracy on its generated answers (None for chat: nothing checkable).
    Code: the stdlib test split has no unit tests, so its answers get the format check (format_ok), and
    the accuracy is HumanEval pass@1."""
    if domain == "chat":
        return {"accuracy": None, "n_generated": 0}
    scores = _scores(sr, domain, examples, weights, cfg)
    # code: the stdlib answers only show whether they have the right form; correctness is HumanEval's
    if domain == "code":
        formats = [s["format_ok"] for s in scores]
        return {**_humaneval(sr, mode, cfg), "format_ok": sum(formats) / len(formats) if formats else None,
                "n_format_checked": len(formats)}
    if not scores:
        return {"accuracy": None, "n_generated": 0}
    acc = {"accuracy": sum(bool(s["correct"]) for s in scores) / len(scores), "n_generated": len(scores)}
    f1 = [s["f1"] for s in scores if s.get("f1") is not None]
    if f1:
        acc["mean_f1"] = sum(f1) / len(f1)
    return acc


def _humaneval(sr: StackedRun, mode: str, cfg: EvalConfig) -> dict:
    """HumanEval pass@1 in `mode` on the first cfg.humaneval problems (humaneval.py says how a problem
    is asked and scored); as {"accuracy", "n_generated", "humaneval": {...}}."""
    if cfg.humaneval == 0:
        return {"accuracy": None, "n_generated": 0}
    t0 = time.time()
    problems = humaneval.load_problems(cfg.humaneval)
    examples = [humaneval.to_example(p) for p in problems]
    prompts = [humaneval.model_prompt(p) for p in problems]
    # asked when the prompt leaves room for an answer as long as the reference one
    asked = [i for i, p in enumerate(problems)
             if fits(sr, prompts[i], len(sr.tok.encode(p.canonical_solution)))]
    weights = mode_weights(sr, mode, [raw_prompt(examples[i]) for i in asked])
    # None: not asked, and a failure in pass@1. pass@1 stays over every problem of the run, so that it
    # compares across modes and with published numbers; dropping the problems that do not fit would
    # make the denominator depend on the model's context length.
    outcomes: list[bool | None] = [None] * len(problems)
    for j, i in enumerate(asked):
        room = sr.model.cfg.max_seq_len - len(sr.tok.encode(prompts[i], bos=True))
        # The whole room is the budget: function_body cuts the answer where the function ends. No repetition
        # penalty by default (humaneval_repetition_penalty 1.0): HumanEval's pass@1 is plain greedy (Chen et
        # al. 2021), and a penalty would punish every indent and repeated variable name code is made of.
        gen = sr.generate(raw_prompt(examples[i]), weights.of(j), max_new_tokens=room, prompt=prompts[i],
                          repetition_penalty=cfg.humaneval_repetition_penalty)
        body = humaneval.function_body(gen["completion"])
        outcomes[i] = humaneval.run_tests(problems[i], body, timeout=cfg.humaneval_timeout)["passed"]
    block = humaneval.pass_at_1(outcomes)
    block["passed_ids"] = [p.task_id for p, o in zip(problems, outcomes) if o]
    if mode in ROUTED_MODES and asked:
        block["routes"] = route_summary(sr.domains, weights.per_prompt)
    block["seconds"] = time.time() - t0
    return {"accuracy": block["pass_at_1"], "n_generated": block["n"], "humaneval": block}


def side_by_side(sr: StackedRun, cfg: EvalConfig) -> list[dict]:
    """One test prompt per domain and a few mixed-domain prompts, answered in every mode."""
    # each domain's first test example whose prompt leaves room for an answer
    firsts = [next((ex for ex in load_split(d, "test", sr.preset.data) if fits(sr, ex.prompt(), 32)), None)
              for d in sr.domains]
    firsts = [ex for ex in firsts if ex is not None]
    prompts = [(ex.domain, raw_prompt(ex), ex.prompt()) for ex in firsts]  # label, raw text, templated prompt
    seen = set()
    for m in mixed_prompts(sr.preset.data, "test", 3):  # a few per kind: the first may not fit
        if (m.kind not in seen and set(m.labels) <= set(sr.domains) and len(seen) < cfg.n_panel_mixed
                and fits(sr, render_alpaca(m.text, ""), 32)):
            seen.add(m.kind)
            prompts.append((m.kind, m.text, None))
    panel = []
    for label, text, prompt in prompts:
        row = {"label": label, "prompt": text, "answers": {}}
        for mode in MODES:
            gen = sr.generate(text, mode, max_new_tokens=min(64, cfg.max_new_tokens), prompt=prompt,
                              repetition_penalty=cfg.repetition_penalty)
            row["answers"][mode] = {"completion": gen["completion"], "weights": describe_weights(gen["weights"])}
        panel.append(row)
    return panel


def add_args(p) -> None:
    add_run_args(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--harness", action="store_true",
                   help="also the benchmarks through lm-evaluation-harness (RUN/harness.json; the preset's "
                        "EvalConfig.harness says how many examples)")
    p.add_argument("--table4", action="store_true",
                   help="with --harness: also the paper's eight benchmarks, whose data come from the hub")


def main(args) -> int:
    if args.table4 and not args.harness:
        raise ValueError("--table4 runs through the harness: give --harness too")
    if Path(args.run).is_dir():
        writable_folder(args.run, "--run")  # eval.json is written into the run
    e = eval_stage(args.run, args.preset, progress=not args.no_progress)
    print("\n".join(eval_table(e)))
    print(f"wrote {e['files']['json']}")
    if args.harness:
        from ..evaluation.harness_tasks import harness_lines
        from .harness_eval import harness_stage

        h = harness_stage(args.run, args.preset, table4=args.table4 or None)
        print("\n".join(harness_lines(h["results"])))
        if "table4_unavailable" in h:
            print(f"Table 4: {h['table4_unavailable']}")
        print(f"wrote {h['files']['json']}")
    return 0
