"""The three presets, in one place: plain dataclass values, nothing hidden elsewhere.

- `smoke`: seconds. A toy model on a few hundred examples per domain; what the tests and the
  notebooks (under CI) run. Numbers from it mean nothing except "the pipeline works".
- `quick`: the demo. The default 4-layer, d=256 model at vocabulary 4096 (the CPU sweet spot,
  offline-resources "CPU speed"), a few minutes of pretraining on 2 cores.
- `paper`: the closest mini replica of the paper we can afford on a laptop (~1 hour for the whole
  pipeline): a deeper, wider base, more data and more steps.

Later stages (stack training, routing, ...) add their own config to `Preset`, always here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .continual import ContinualConfig
from .data import DataConfig
from .evaluate import EvalConfig
from .model import ModelConfig
from .pretrain import PretrainConfig
from .router import RouterConfig
from .stacks import AdapterConfig
from .train import BoostConfig, StackTrainConfig


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
    ),
    stack=StackTrainConfig(steps=12, batch_size=8, seq_len=192, lr=3e-3, warmup_steps=3, eval_every=4,
                           max_val_examples=20),
    boost=BoostConfig(max_rounds=2),
    continual=ContinualConfig(rounds=2, ns_k=4, ns_examples=20),
    router=RouterConfig(prompts_per_domain=20, mixed_per_kind=4, epochs=3),
    # HumanEval: the first 24 problems; at vocabulary 512 nearly every prompt overflows the 256-token context,
    # and HumanEval/23 is the first that fits (measured), so the CLI tests ask one problem per mode
    eval=EvalConfig(n_loss=20, n_generate=2, max_new_tokens=16, n_panel_mixed=2, humaneval=24),
)

QUICK = Preset(
    name="quick",
    data=DataConfig(),  # 3,000 examples per domain, 200 val / 200 test
    vocab_size=4096,
    model=ModelConfig(n_layer=4, d_model=256, n_head=4, n_kv_head=2, max_seq_len=256),
    pretrain=PretrainConfig(steps=160, eval_every=20, ckpt_every=20),
    stack=StackTrainConfig(steps=40, batch_size=8, lr=1e-3, warmup_steps=8, eval_every=10, max_val_examples=64),
    boost=BoostConfig(max_rounds=3),
    # 5 domains x 1 round x 30 steps, twice (with and without null-space) in the demo: every frozen stack
    # is in the forward and backward pass of later training, so the continual runs dominate the demo's time
    continual=ContinualConfig(rounds=1, steps=30, ns_k=16, ns_examples=64),
    # the oracle runs 32 passes (every combination of 5 domains, and the base) over the router's prompts.
    # 30 epochs: with ~160 training prompts, the paper's 8 epochs are ~90 steps, too few to leave the
    # undecided band (measured on an earlier demo run, with top-1 and set match scored against the domain
    # labels: 0.57 / 0.00 after 8 epochs, 0.96 / 0.92 after 30)
    router=RouterConfig(prompts_per_domain=24, mixed_per_kind=20, epochs=30),
    eval=EvalConfig(n_loss=100, n_generate=5, max_new_tokens=96),
)

PAPER = Preset(
    name="paper",
    data=DataConfig(max_examples=6000),
    vocab_size=4096,
    model=ModelConfig(n_layer=6, d_model=384, n_head=6, n_kv_head=2, max_seq_len=256),
    pretrain=PretrainConfig(steps=600, lr=1.5e-3, warmup_steps=40, eval_every=50, ckpt_every=50),
    stack=StackTrainConfig(steps=200, batch_size=16, lr=1e-3, warmup_steps=40, eval_every=25),
    # the paper's TinyLlama null-space setting (n=200, K=32) and Gemma's 2 rounds per domain. Our k/v outputs
    # are 2 x 64 = 128 wide, so medical and reasoning would protect 96 and 128 of them: the ns_max_share cap
    # (half) binds there, with a warning, and each earlier domain keeps 21 and 16 k/v directions
    continual=ContinualConfig(rounds=2, steps=120, ns_k=32, ns_examples=200),
    router=RouterConfig(prompts_per_domain=200, mixed_per_kind=60),
    eval=EvalConfig(n_loss=200, n_generate=50),
)

PRESETS = {p.name: p for p in (SMOKE, QUICK, PAPER)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def with_vocab(preset: Preset, vocab_size: int) -> Preset:
    """The preset with the model's vocabulary set to the trained tokenizer's size."""
    return replace(preset, model=replace(preset.model, vocab_size=vocab_size))
