"""A trained run inside lm-evaluation-harness (`lm-eval` 0.4.13): one mode of it as a harness model.

    harness task ──requests──► StackedLM(run, mode)                                     ──► scores
      (context, continuation)    route(context alone) ──► StacksOn ──┐                     (logprob, greedy)
      (context, gen_kwargs)      base + Σ_d w_d · stacks of d  ◄─────┘ batched per setting  text until a stop

`StackedLM` is an `lm_eval.api.model.LM` over an inference.StackedRun: the CPU model and a scale/ base
(scale.model.PretrainedLM) alike, since both answer the same calls (`model(ids).logits`, `model(ids,
at=mask)`, `model.generate`, `model.cfg.max_seq_len`) and `run.load_run` builds either. Its mode is one of
inference.MODES; the routed modes route every request on its context alone, as the paper did (§9): the
router reads the raw prompt, so a context in the Alpaca template is routed on the instruction and input
inside it (`route_text`), the form the router was trained on; any other context is routed as it is.
Requests that share a context (a question's four options) share its route, and requests under one setting
of the stacks share batches.

The three request types:
    loglikelihood          log p(continuation | context) = Σ_t log p(c_t | context, c_<t), and whether
                           greedy decoding would give the continuation; one forward per batch
    loglikelihood_rolling  the log-likelihood of a whole text, in windows of the model's context
                           (lm_eval.utils.get_rolling_token_windows: every token predicted once)
    generate_until         greedy (or sampled) text until one of `until` or max_gen_toks, in chunks so
                           a stop ends the work early

Context and continuation are encoded apart, `<bos> context` then `continuation`, as training encodes
prompt and response (training/examples.encode_example), so a continuation is scored in the tokens the
stacks learnt to produce. (The harness's Hugging Face model encodes them together and moves the context's
trailing spaces to the continuation; a prompt in the Alpaca template ends in a newline the model was
trained to read as the prompt's.) A pair longer than the context keeps the end, as the harness does, and
is counted in `truncated`.

Multiple choice by the paper's rule. The harness's `acc` picks the option with the highest summed
log-prob and `acc_norm` divides it by the option's length in characters; the paper picks the highest mean
per-token log-prob (docs/brainstacks.md §9). `mean_logprob_accuracy` computes that from the samples the
harness logs (each option's summed log-prob) and the number of tokens this model scored for it:

    s_j = (1/|c_j|) Σ_t log p(c_j,t | context, c_j,<t)        pick argmax_j s_j   (ties: the first, as acc)

so `acc_mean` stands beside `acc` and `acc_norm` for every multiple-choice task, the hub's included.
With `score_eos` the continuation's <eos> is scored too: evaluation/choice.py's rule exactly.

`evaluate(run, tasks, modes, ...)` runs `lm_eval.simple_evaluate` once per mode, offline, and returns
{task: {mode: {metric: {"value", "n", "interval"}}}}, with a 95% interval per metric (Wilson for a 0/1
metric, as tasks.wilson_interval; the normal one otherwise). harness_tasks.py writes the local task files.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import render_alpaca
from ..inference.stacked import MODES, StackedRun
from ..runtime import training_state
from ..stacks.layer import StacksOn, stacks_on
from ..training.examples import logits_at
from .modes import mode_weights
from .tasks import Z_95, wilson_interval

try:
    from lm_eval.api.model import LM
except ModuleNotFoundError:  # the rest of ministacks runs without it; using this file says what to install
    LM = None

INSTALL = "the harness needs lm-evaluation-harness: pip install lm_eval==0.4.13 (it is in requirements.txt)"
BATCH_SIZE = 16  # requests per forward where they share one setting of the stacks
GENERATE_CHUNK = 32  # tokens generated between checks for a stop sequence: a stop found ends the request
MAX_GEN_TOKS = 256  # the harness's own default, and the paper's GSM8K budget (docs/brainstacks.md §9)

# the Alpaca template's sections (data.ALPACA_TEMPLATE): the router reads what is inside them
_ALPACA = re.compile(r"### Instruction:\n(?P<instruction>.*?)\n\n### Input:\n(?P<input>.*?)\n\n### Response:\n", re.S)


def require_lm_eval() -> None:
    if LM is None:
        raise ModuleNotFoundError(INSTALL)


def route_text(context: str) -> str:
    """What the router reads for a request: the instruction and input of the context's last Alpaca prompt
    (data.raw_prompt's form: "instruction\\n\\ninput", the input left out when empty), or the context itself
    when it holds none (a hub task's plain question)."""
    found = None
    for found in _ALPACA.finditer(context):
        pass  # the last one: a few-shot context holds several, and the question asked is the last
    if found is None:
        return context
    return "\n\n".join(part for part in (found["instruction"], found["input"]) if part)


class StackedLM(LM or object):
    """One mode of a StackedRun as an lm-eval model (module docstring). `template`: wrap a context that is not
    already an Alpaca prompt in one (the instruction; a hub task's question asked as the paper asks GSM8K).
    `score_eos`: score each continuation's <eos> too. `truncated` counts the requests cut to fit the context
    (a prompt left without room to generate is answered with nothing and counted there too)."""

    def __init__(self, run: StackedRun, mode: str = "routed", batch_size: int = BATCH_SIZE, template: bool = False,
                 score_eos: bool = False, seed: int = 0):
        require_lm_eval()
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
        if mode != "base" and mode != "ungated" and run.router is None:
            raise FileNotFoundError(f"{mode} mode needs the router of {run.where}: run `python -m ministacks "
                                    f"route --run {run.where}` first")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.run, self.mode, self.batch_size = run, mode, int(batch_size)
        self.template, self.score_eos, self.seed = template, score_eos, seed
        self.max_len = run.model.cfg.max_seq_len
        self.truncated = {"loglikelihood": 0, "loglikelihood_rolling": 0, "generate_until": 0}

    # -- what the model reads -------------------------------------------------------------------------
    def prompt(self, context: str) -> str:
        """The text the model is conditioned on: the context, in the Alpaca template if `template` asks."""
        if self.template and _ALPACA.search(context) is None:
            return render_alpaca(context, "")
        return context

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(`<bos> context` ids, continuation ids [+ <eos>]), encoded apart as training encodes prompt and
        response. A context that encodes to nothing (no <bos> in this tokenizer) is the <eos>, as in the harness."""
        tok = self.run.tok
        ctx = tok.encode(self.prompt(context), bos=True) or [tok.eos_id]
        return ctx, tok.encode(continuation, eos=self.score_eos)

    def scored_tokens(self, context: str, continuation: str) -> int:
        """How many tokens of the continuation `loglikelihood` scores: |c|, or the model's context if shorter."""
        return min(len(self.encode_pair(context, continuation)[1]), self.max_len)

    def settings(self, contexts: Sequence[str]) -> list[StacksOn]:
        """The stacks for each request: the mode's one setting, or (routed, switched) each context's route,
        every distinct context routed once (modes.mode_weights, as the evaluation routes its prompts)."""
        if self.mode not in ("routed", "switched"):
            return [self.run.stacks_for(self.mode)] * len(contexts)
        unique = list(dict.fromkeys(contexts))
        weights = mode_weights(self.run, self.mode, [route_text(c) for c in unique])
        at = {c: weights.of(i) for i, c in enumerate(unique)}
        return [at[c] for c in contexts]

    # -- loglikelihood ----------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*r.args) for r in requests]
        return self._score(pairs, self.settings([r.args[0] for r in requests]), "loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood after <bos> (or <eos>), in disjoint windows of the context, every token
        predicted once with as much context before it as fits (the harness's windowing). The routed modes
        route each text on itself."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        tok = self.run.tok
        prefix = (tok.encode("", bos=True) or [tok.eos_id])[0]
        pairs, owner = [], []
        for n, r in enumerate(requests):
            ids = tok.encode(r.args[0])
            for window in get_rolling_token_windows(ids, prefix, self.max_len, context_len=1):
                ctx, cont = make_disjoint_window(window)
                pairs.append((ctx, cont))
                owner.append(n)
        settings = self.settings([requests[n].args[0] for n in owner])
        total = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self._score(pairs, settings, "loglikelihood_rolling")):
            total[n] += logprob
        return total

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]], settings: list[StacksOn], kind: str
               ) -> list[tuple[float, bool]]:
        """(Σ log p of the continuation, is it the greedy one) for every (context ids, continuation ids),
        batched longest first, each row under its request's setting, right-padded (causal: padding is never seen)."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        model, pad = self.run.model, self.run.tok.pad_id
        with training_state(model, False):
            # every request in one queue, longest first: a batch mixes settings, each row under its own
            # (StacksOn.per_row), so the routed modes batch as the fixed ones do
            rows = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
            for b in range(0, len(rows), self.batch_size):
                batch = rows[b : b + self.batch_size]
                seqs, n_cont = [], []
                for i in batch:
                    ctx, cont = pairs[i]
                    whole = (ctx + cont)[-(self.max_len + 1):]  # the end is kept: the continuation is scored
                    self.truncated[kind] += len(whole) < len(ctx) + len(cont)
                    seqs.append(whole)
                    n_cont.append(min(len(cont), len(whole) - 1))
                x = torch.full((len(batch), max(len(s) - 1 for s in seqs)), pad)
                at = torch.zeros(x.shape, dtype=torch.bool)  # the positions that predict a continuation token
                targets = []
                for j, (s, n) in enumerate(zip(seqs, n_cont)):
                    x[j, : len(s) - 1] = torch.tensor(s[:-1])
                    at[j, len(s) - 1 - n : len(s) - 1] = True
                    targets += s[len(s) - n:]
                with stacks_on(model, StacksOn.per_row([settings[i] for i in batch])):
                    logits = logits_at(model, x, at).float()  # [N, V], N = Σ continuation tokens
                target = torch.tensor(targets)
                logp = F.log_softmax(logits, -1).gather(1, target[:, None])[:, 0]  # [N]
                greedy = logits.argmax(-1) == target  # [N]
                for i, lp, g in zip(batch, logp.split(n_cont), greedy.split(n_cont)):
                    out[i] = (float(lp.sum()), bool(g.all()))
        return out

    # -- generation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's text, cut before the first of its `until` strings. Greedy unless gen_kwargs ask for
        sampling (do_sample / temperature > 0, seeded); `repetition_penalty` as the model's generate applies it.
        Requests of one setting and one prompt length share a batch (generate takes prompts of equal length)."""
        tok, model = self.run.tok, self.run.model
        out = [""] * len(requests)
        jobs = []
        for i, r in enumerate(requests):
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.pop("max_gen_toks", MAX_GEN_TOKS))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            if not kwargs.pop("do_sample", temperature > 0):
                temperature = 0.0
            penalty = float(kwargs.pop("repetition_penalty", 1.0))
            ids = tok.encode(self.prompt(context), bos=True) or [tok.eos_id]
            room = self.max_len - len(ids)
            if room < 1:  # no room to answer: cutting the prompt's start would change what is asked
                self.truncated["generate_until"] += 1
                continue
            jobs.append((i, ids, until, min(budget, room), temperature, penalty))
        settings = self.settings([requests[j[0]].args[0] for j in jobs])
        groups: dict[tuple, list[int]] = {}
        for n, (i, ids, until, budget, temperature, penalty) in enumerate(jobs):
            key = (settings[n], len(ids), tuple(until), budget, temperature, penalty)
            groups.setdefault(key, []).append(n)
        generator = torch.Generator().manual_seed(self.seed)
        with training_state(model, False):
            for (on, _, until, budget, temperature, penalty), members in groups.items():
                for b in range(0, len(members), self.batch_size):
                    batch = [jobs[n] for n in members[b : b + self.batch_size]]
                    with stacks_on(model, on):
                        texts = self._generate([j[1] for j in batch], list(until), budget, temperature, penalty,
                                               generator)
                    for job, text in zip(batch, texts):
                        out[job[0]] = text
        return out

    def _generate(self, prompts: list[list[int]], until: list[str], budget: int, temperature: float,
                  penalty: float, generator: torch.Generator) -> list[str]:
        """Continue prompts of equal length, GENERATE_CHUNK tokens at a time; a row stops at <eos>, at a stop
        string or at the budget, and the rows still going (all of one length) continue together. In one go
        or in chunks the tokens are the same: the penalty reads the whole sequence either way."""
        tok, model = self.run.tok, self.run.model
        seqs = [list(p) for p in prompts]
        new: list[list[int]] = [[] for _ in prompts]
        texts = [""] * len(prompts)
        live = list(range(len(prompts)))
        while live:
            step = min(GENERATE_CHUNK, budget - len(new[live[0]]))
            grown = model.generate(torch.tensor([seqs[i] for i in live]), step, temperature=temperature,
                                   repetition_penalty=penalty, eos_id=tok.eos_id, generator=generator)
            still = []
            for i, row in zip(live, grown.tolist()):
                added = row[len(seqs[i]):]
                ended = tok.eos_id in added
                added = added[: added.index(tok.eos_id)] if ended else added
                new[i] += added
                seqs[i] += added
                texts[i] = tok.decode(new[i])
                cut = min((texts[i].find(s) for s in until if s and s in texts[i]), default=-1)
                if cut >= 0:
                    texts[i] = texts[i][:cut]
                elif not ended and len(new[i]) < budget:
                    still.append(i)
            live = still
        return texts


# --- scoring what the harness returns ------------------------------------------------------------------

def mean_logprob_accuracy(samples: list[dict], lm: StackedLM) -> list[float]:
    """The paper's rule on a multiple-choice task's logged samples: 1.0 where the option with the highest
    mean per-token log-prob (its summed log-prob over the tokens `lm` scored for it) is the target, else 0.0."""
    out = []
    for s in samples:
        lls = [float(r[0]) for r in s["filtered_resps"]]
        means = [ll / max(1, lm.scored_tokens(ctx, cont)) for ll, (ctx, cont) in zip(lls, s["arguments"])]
        pick = max(range(len(means)), key=lambda j: (means[j], -j))  # ties to the first, as acc's argmax
        gold = s["target"]
        out.append(float(pick in gold if isinstance(gold, list) else pick == int(gold)))
    return out


def interval(values: Sequence[float]) -> tuple[float, float]:
    """95% interval of a mean over examples: Wilson for 0/1 values, else mean ± 1.96 · sd / √n."""
    n = len(values)
    if n == 0:
        return (0.0, 1.0)
    if all(v in (0.0, 1.0) for v in values):
        return wilson_interval(int(sum(values)), n)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, n - 1))
    return (mean - Z_95 * sd / math.sqrt(n), mean + Z_95 * sd / math.sqrt(n))


def leaf_tasks(name: str, group_subtasks: dict[str, list[str]]) -> list[str]:
    """A task's name, or the tasks a group (mmlu: 57 subjects in 4 groups) holds, down to the leaves."""
    if name not in group_subtasks:
        return [name]
    return [leaf for sub in group_subtasks[name] for leaf in leaf_tasks(sub, group_subtasks)]


def summarise(out: dict, names: Sequence[str], lm: StackedLM) -> dict:
    """{task: {metric: {"value", "n", "interval"}}} from simple_evaluate's output (with its samples), a group's
    subtasks pooled (every example weighs the same, the harness's default for a group); a multiple-choice
    task gains `acc_mean` (the paper's rule, mean_logprob_accuracy)."""
    result = {}
    for name in names:
        values: dict[str, list[float]] = {}
        for leaf in leaf_tasks(name, out.get("group_subtasks", {})):
            samples = out["samples"].get(leaf, [])
            for s in samples:
                for metric in s["metrics"]:
                    values.setdefault(metric, []).append(float(s[metric]))
            if out["configs"].get(leaf, {}).get("output_type") == "multiple_choice":
                values.setdefault("acc_mean", []).extend(mean_logprob_accuracy(samples, lm))
        result[name] = {m: {"value": sum(v) / len(v) if v else None, "n": len(v), "interval": list(interval(v))}
                        for m, v in values.items()}
    return result


def evaluate(run: StackedRun, tasks: Sequence[str], modes: Sequence[str] = ("base", "ungated", "routed"),
             include_path: str | Path | None = None, limit: int | None = None, batch_size: int = BATCH_SIZE,
             template: bool = False, score_eos: bool = False, verbosity: str = "ERROR") -> dict:
    """Run `tasks` (local ones from `include_path`, harness_tasks.write_tasks; without it, the harness's own)
    in every mode through `lm_eval.simple_evaluate`, offline for local tasks. Returns {task: {mode: {metric:
    {"value", "n", "interval"}}, ...}, "truncated": {mode: counts}} (harness_tasks.harness_table prints it)."""
    require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    if include_path is not None:  # every file is here: nothing is to be fetched, and nothing may be
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    manager = (TaskManager(include_path=str(include_path), include_defaults=False)
               if include_path is not None else TaskManager())
    result: dict = {name: {} for name in tasks}
    result["truncated"] = {}
    for mode in modes:
        lm = StackedLM(run, mode, batch_size=batch_size, template=template, score_eos=score_eos)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      bootstrap_iters=0, log_samples=True, verbosity=verbosity)
        for name, metrics in summarise(out, tasks, lm).items():
            result[name][mode] = metrics
        result["truncated"][mode] = dict(lm.truncated)
    return result
