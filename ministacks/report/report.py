"""`report.md`: what a run did, in numbers, figures and samples. Each stage contributes a section.

report.md sits in the run folder: a `# title`, then the sections in the caller's order (`write_report`;
stages/demo.py writes one after every stage has run). Each section is a function of one results JSON
only, so a report can be rebuilt from a finished folder without training anything:

    section              reads (written by)                     shows
    data_section         pretrain.json "data" (pretrain.py)     examples per split and domain, the corpus
    pretrain_section     pretrain.json (pretrain.py)            the base: loss vs unigram entropy, samples
    compare_section      compare.json (compare.py)              Exp 1, MoE-LoRA vs single LoRA (§1, §9)
    boost_section        boost.json (boost.py)                  residual boosting rounds on chat (§3)
    forgetting_section   forgetting.json (continual.py)         forgetting matrices, null-space (§4, §5)
    router_section       RUN/router.json (route.py)             the oracle's targets and the router (§6; router.py)
    eval_section         RUN/eval.json (evaluate.py)            base / ungated / routed / switched (§7, §9;
                                                                evaluation.py)

(§N: docs/brainstacks.md §N; writers in ministacks/stages/.) Each links its stage's figure (plots.py).

The rule: every sentence that compares or concludes is built from the numbers it compares.
  - the word is chosen from the numbers: `compare_word` says "below" or "above" (or "equal to");
  - a count is counted: checkpoints ahead, off-diagonal losses lowered, domains where routed beats base;
  - a finding the run did not measure is never printed: one boosting round, no medical prompts, no
    domain in all three modes each get a sentence that says so;
  - the paper's number stands beside ours whichever way the comparison goes (report/paper.py holds
    every one). A non-reproduction is stated by the two numbers and the word between them, never
    explained away. Fixed text describes the method or quotes the paper, never one of the run's results.
"""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_write_text
from ..lm.model import PROJECTION_NAMES
from ..lm.pretrain import PretrainConfig
from .findings import compare_word, control_sentence
from .plots import recorded_adapter


def fence(text: str) -> str:
    return "````text\n" + text.rstrip() + "\n````"  # a completion may hold backticks: a longer fence


def data_section(stats: dict) -> str:
    """The examples per split of every domain and the general corpus, from pretrain.json's "data"
    (the sizes data/general.py's `build_all` returns; "chars" counts a domain's text over all splits)."""
    rows = ["| domain | train | val | test | chars |", "|---|---:|---:|---:|---:|"]
    for domain, s in stats.items():
        if isinstance(s, dict) and "train" in s:  # a domain; not "general" (a sentence below), "cache" (a path)
            rows.append(f"| {domain} | {s['train']:,} | {s['val']:,} | {s['test']:,} | {s.get('chars', 0):,} |")
    general = stats.get("general", {})
    lines = ["## Data", "", *rows, ""]
    if general:
        prose = (f", of which {general['prose_docs']:,} documents ({general['prose_chars']:,} characters) are general "
                 "prose from the training topics of the Python reference manual" if general.get("prose_docs") else "")
        lines.append(f"General pretraining corpus: {general.get('docs', 0):,} documents, {general.get('chars', 0):,} "
                     f"characters{prose}; from training examples and training topics only (no validation or test "
                     "example of any domain, no held-out topic).")
    return "\n".join(lines) + "\n"


def pretrain_section(s: dict) -> str:
    """The base model from pretrain.json: size, throughput, validation loss against the unigram entropy
    H = −Σ p log p of the token frequencies, characters per token, and greedy samples per domain."""
    penalty = s.get("config", {}).get("pretrain", {}).get("repetition_penalty", PretrainConfig().repetition_penalty)
    gap = s["unigram_entropy"] - s["val_loss"]  # the unigram model ignores context: the gap is what it taught
    lines = [
        "## Pretraining from random initialisation",
        "",
        f"- model: {s['params']:,} parameters, vocabulary {s['vocab_size']:,} "
        f"({s['config']['model']['n_layer']} layers, d={s['config']['model']['d_model']})",
        f"- tokens seen: {s['tokens_seen']:,} at {s['tokens_per_second']:,.0f} tokens/s "
        f"({s['train_seconds']:.0f} s of training)",
        f"- **validation loss {s['val_loss']:.3f} nats/token** vs the corpus's unigram entropy "
        f"{s['unigram_entropy']:.3f} (a model that ignores context): {gap:+.3f} nats learned from context",
        "",
        "![pretraining loss](pretrain_loss.png)",
        "",
        "Tokenizer: characters per token on each domain's validation text — "
        + ", ".join(f"{d} {v:.2f}" for d, v in s["tokenizer"]["chars_per_token"].items()),
        "",
        # the penalty the samples were drawn with (pretrain.json's config; the paper's 1.2 by default, §7)
        f"### Greedy samples per domain (held-out prompts; repetition penalty {penalty:g})",
        "",
    ]
    for domain, items in s["samples"].items():
        for item in items:
            lines += [f"**{domain}** — prompt, then the base model's continuation:", "", fence(item["prompt"]),
                      "", fence(item["completion"]), ""]
    return "\n".join(lines)


def write_report(out: str | Path, sections: list[str], title: str) -> Path:
    """OUT/report.md: `# title`, then the sections joined by newlines; written atomically, so a kill
    mid-write leaves the previous report whole. Returns its path."""
    path = Path(out) / "report.md"
    atomic_write_text(path, f"# {title}\n\n" + "\n".join(sections))
    return path


def compare_section(c: dict) -> str:
    """Experiment 1 from compare.json (docs/brainstacks.md §9): parameters, final validation loss and
    seconds per step of both arms beside the paper's, the step-time ratio, and at how many checkpoints
    MoE-LoRA's validation loss is below the single LoRA's."""
    p = c["paper"]  # report/paper.py's PAPER_EXP1, carried in compare.json
    moe, lora = c["moe"], c["lora"]
    # the run's own adapter shape (compare.json written before it was recorded: the paper's literal one)
    a = recorded_adapter(c)
    ahead = sum(1 for (s, m), (_, l) in zip(moe["val_curve"][1:], lora["val_curve"][1:]) if m < l)
    n = len(moe["val_curve"]) - 1  # step 0 is no checkpoint: both arms are the zero-init identity there
    # the paper reports minutes for its 400-step runs (§9): per step, to sit beside our seconds per step;
    # its 2.1× (20.2 / 9.5 min) and "8 of 8" (MoE below LoRA at every one of its checkpoints) are quoted
    return "\n".join([
        "## Experiment 1 — MoE-LoRA vs the parameter-matched single LoRA",
        "",
        f"Domain `{c['domain']}`, base `{c['quant']}`, same steps, learning rate, data order and seed.",
        "",
        f"| | MoE-LoRA {a['n_experts']} × r{a['r']}, top-{a['top_k']} | single LoRA r{a['lora_r']} | "
        "paper MoE-LoRA | paper LoRA |",
        "|---|---:|---:|---:|---:|",
        f"| parameters | {moe['params']:,} | {lora['params']:,} | {p['params']['moe'] / 1e6:.1f}M | "
        f"{p['params']['lora'] / 1e6:.1f}M |",
        *share_rows(c),
        f"| final validation loss | {moe['final']:.4f} | {lora['final']:.4f} | {p['moe'][-1]:.4f} | "
        f"{p['lora'][-1]:.4f} |",
        f"| seconds per step | {moe['seconds_per_step']:.3f} | {lora['seconds_per_step']:.3f} | "
        f"{p['minutes']['moe'] * 60 / 400:.2f} | {p['minutes']['lora'] * 60 / 400:.2f} |",
        "",
        f"MoE-LoRA step time is **{c['speed_ratio_moe_over_lora']:.2f}×** the single LoRA's (paper: 2.1×). "
        f"MoE-LoRA is ahead at {ahead} of {n} checkpoints (paper: 8 of 8).",
        "",
        "![MoE-LoRA vs LoRA](compare.png)",
        "",
    ])


def share_rows(c: dict) -> list[str]:
    """The stacks' share of the base beside the paper's (one table row), when compare.json records it."""
    if "stack_share" not in c:
        return []
    paper = c["paper_stack_share"]
    quoted = ", ".join(f"{v:.1%} of {k}" for k, v in paper.items())
    return [f"| share of the base ({c['base_params']:,} parameters) | {c['stack_share']['moe']:.1%} | "
            f"{c['stack_share']['lora']:.1%} | {quoted} | |"]


def boost_section(b: dict) -> str:
    """Residual boosting from boost.json (docs/brainstacks.md §3): one table row per round (loss before,
    best, gain = before − best, why it stopped), and round 2's best against round 1's beside the
    paper's (round 2 best, 0.8531; round 3 worse)."""
    rows = ["| round | loss before | best | gain | stopped by |", "|---:|---:|---:|---:|---|"]
    for i, r in enumerate(b["rounds"]):
        rows.append(f"| {i + 1} | {r['pre_loss']:.4f} | {r['best_loss']:.4f} | {r['pre_loss'] - r['best_loss']:+.4f} "
                    f"| {r['stop_reason']} (step {r['best_step']} best of {r['steps_run']}) |")
    best = [r["best_loss"] for r in b["rounds"]]
    if len(best) > 1:  # the paper's finding is about round 2: with one round there is nothing to compare
        finding = (f"Round 2's best ({best[1]:.4f}) is {compare_word(best[1], best[0])} round 1's "
                   f"({best[0]:.4f}), a change of {best[1] - best[0]:+.4f}.")
    else:
        finding = "Only one round ran, so there is no round 2 to compare with round 1."
    if "control" in b:  # not in the paper: one stack trained as long as all the rounds together
        finding += " " + control_sentence(b)  # the sentence the findings table prints under it
    return "\n".join([
        f"## Residual boosting on {b['domain']}",
        "",
        f"Each round adds a fresh stack over the frozen ones; the loop stops when a round after the first gains "
        f"less than {b['min_improvement']}. {len(b['rounds'])} round(s) ran. {finding} Paper (TinyLlama, chat): "
        f"{b['paper']['note']}, best {b['paper']['round2_best']}.",
        "",
        *rows,
        "",
        "![residual boosting](boost.png)",
        "",
    ])


def _matrix_table(domains: list[str], matrix: list[list]) -> list[str]:
    """A forgetting matrix as markdown rows: row i after training domain i, column j the loss on domain j;
    None (a domain not trained yet, j > i) is shown as "–"."""
    rows = ["| after \\ on | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
    for d, row in zip(domains, matrix):
        rows.append(f"| {d} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in row) + " |")
    return rows


def _off_diagonal(matrix: list[list]) -> list[float]:
    """The entries below the diagonal: an earlier domain's loss after a later domain was trained."""
    # where forgetting shows; the diagonal, a domain's own loss just after training it, is not protected by
    # null-space projection, which restricts the new stack and may cost it there (§5: code 0.788 → 0.819)
    return [v for i, row in enumerate(matrix) for j, v in enumerate(row) if j < i and v is not None]


def capacity_lines(by_projection: dict) -> list[str]:
    """Per domain and projection type (q_proj, k_proj, ...): the largest protected share over layers, and
    where the ns_max_share cap bound (fewer directions kept per earlier domain than asked). Reads
    forgetting.json's "capacity_by_projection", {domain: {layer name: {"protected", "d_out", "share",
    "asked", "k_per_domain", "capped"}}} (training/nullspace.py's `capacity_by_projection`)."""
    if not by_projection:
        return []
    rows = ["", "| protected share | " + " | ".join(PROJECTION_NAMES) + " |",
            "|---|" + "---:|" * len(PROJECTION_NAMES)]
    capped = []
    for domain, layers in by_projection.items():
        cells = []
        for proj in PROJECTION_NAMES:
            entries = [e for name, e in layers.items() if name.endswith(proj)]  # "layers.3.self_attn.q_proj"
            if not entries:
                cells.append("–")
                continue
            worst = max(entries, key=lambda e: e["share"])  # not the mean: the fullest layer is where room ends
            cells.append(f"{worst['share']:.0%}" + (" (capped)" if any(e["capped"] for e in entries) else ""))
            if any(e["capped"] for e in entries):
                capped.append(f"{domain} {proj}: {worst['asked']} of {worst['d_out']} asked, {worst['protected']} "
                              f"protected ({worst['k_per_domain']} per earlier domain)")
        rows.append(f"| {domain} | " + " | ".join(cells) + " |")
    rows.append("")  # a sentence either way: a cap that never bound means every layer kept the K asked
    rows.append("The capacity cap bound on " + "; ".join(capped) + "." if capped else
                "The capacity cap did not bind on any projection.")
    return rows


def forgetting_section(f: dict) -> str:
    """The continual run from forgetting.json (docs/brainstacks.md §4, §5): each run's forgetting matrix,
    with − without null-space and how many off-diagonal losses it lowered beside the paper's count, the
    paper's matrices, and the protected capacity per domain (mean, then per projection type)."""
    # one loss definition: the paper's Table 2 and its matrix use two, which reads as forgetting (§4)
    lines = ["## Continual domains and null-space projection", "",
             "Validation loss of every domain seen so far, all stacks on (ungated), after training each domain "
             "in curriculum order (one loss definition everywhere).", ""]
    for name, run in f["runs"].items():
        lines += [f"**{name}**", "", *_matrix_table(run["domains"], run["matrix"]), ""]
    p = f["paper"]  # report/paper.py's PAPER_FORGETTING, carried in forgetting.json
    if "difference" in f:  # both runs trained (the demo's compare_nullspace)
        ours = _off_diagonal(f["difference"])  # with − without: negative where null-space lowered the loss
        # the paper's with − without, as ours; its curriculum differs, so the counts compare, not the cells
        paper = _off_diagonal([[None if x is None or y is None else y - x for x, y in zip(a, b)]
                               for a, b in zip(p["without null-space"], p["with null-space"])])
        lines += ["**with − without** (negative: null-space helped)", "",
                  *_matrix_table(f["domains"], f["difference"]), "",
                  f"Null-space projection lowered {sum(v < 0 for v in ours)} of the {len(ours)} cross-domain "
                  f"(off-diagonal) losses here; in the paper it lowered {sum(v < 0 for v in paper)} "
                  f"of {len(paper)}.", ""]
    lines += ["The paper's numbers (TinyLlama, its curriculum chat → code → medical → math; "
              "without → with null-space):",
              "", "| after \\ on | " + " | ".join(p["domains"]) + " |", "|---|" + "---:|" * len(p["domains"])]
    for d, a, b in zip(p["domains"], p["without null-space"], p["with null-space"]):
        cells = ["–" if x is None else f"{x:.3f} → {y:.3f}" for x, y in zip(a, b)]  # one cell a pair, as §5
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    if f.get("capacity"):  # K per earlier domain adds up: the last domains may find little room left
        lines += ["", "Directions protected while training each domain, as a share of a projection's outputs "
                  "(mean over projections; the paper's capacity argument: each domain claims 64 of 3840 on Gemma): "
                  + ", ".join(f"{d} {v:.1%}" for d, v in f["capacity"].items()) + "."]
        lines += capacity_lines(f.get("capacity_by_projection", {}))
    lines += ["", "![forgetting matrices](forgetting.png)", "",
              "Principal output subspaces of each domain's stacks: cross-domain similarity, singular-value spectra, "
              "and how orthogonal later stacks are to the directions they were kept out of:", "",
              "![subspaces](subspaces.png)", ""]
    return "\n".join(lines)
