"""ministacks: Brainstacks — frozen MoE-LoRA adapter stacks for continual multi-domain fine-tuning — from scratch.

The package is laid out as the paper is: the base model, the adapters, the stacked layer, stack
training (boosting, continual domains, null-space projection), the meta-router, inference; then the
checks, the report, the presets, the run folder, and the stages the commands run. Imports only point
down this list (tests/test_architecture.py reads every import and fails on one that points up or
round a loop): a mechanism never imports a preset, a stage or the command line.

  io.py  checkpoint.py  runtime.py   atomic files and checksums; the one checkpoint format; process state
  data/          five real domain corpora that install offline, their splits, mixed prompts, general
                 held-out prose, user data
  lm/            the base model
    model.py       a LLaMA-style decoder from scratch (RMSNorm, RoPE, SwiGLU, GQA, KV cache), HF names
    tokenizer.py   byte-level BPE trained with `tokenizers`
    quant.py       NF4 4-bit quantization by hand (bit-exact with bitsandbytes) and a frozen 4-bit linear
    pretrain.py    pretraining from random initialisation: atomic checkpoints, exact resume
    base.py        the pretrained base on disk: its record, checksums and checked loading
  adapters/      what one stack is made of
    lora.py        the single LoRA (the baseline), rsLoRA scaling
    moe_lora.py    MoE-LoRA: 4 experts x rank 16, noisy top-2 routing, load-balance loss
  stacks/        frozen stacks on a frozen base
    layer.py       StackedLinear (base + weighted frozen stacks + one active), StacksOn
    fused.py       inference: every frozen stack of the projections that read one input, in one pass
    store.py       one stack on disk: safetensors + a checked JSON record, base fingerprints
    manifest.py    RUN/manifest.json (what a run has done, with its Preset) and the one cache key
    proportions.py how big a stack is against its base; the rank that keeps the paper's share
  training/      training stacks
    examples.py    the data a round reads and the one loss every stage measures
    sft.py         one round of stack training (best-stack guard, checkpoints) and residual boosting
    nullspace.py   null-space directions: randomized SVD by hand, bases per domain, the capacity cap
    projection.py  keeping a stack out of them: the forward projection, strict mode, leakage
    continual.py   the outer loop over domains in curriculum order, and undoing a run (repair)
  routing/       which domains' stacks a prompt needs
    oracle.py      the router's targets: every combination of stacks on every answer
    router.py      the outcome-based sigmoid meta-router: features, model, loss, training, rule, on disk
  inference/
    stacked.py     a model with stacks and a router: route, generate in a mode (base, ungated, routed,
                   switched) or with given weights
  evaluation/    what an answer is worth
    tasks.py       the checks per domain (#### numbers, final answers, ICD codes, definitions, code format)
    humaneval.py   HumanEval pass@1 with its unit tests
    forced.py      would greedy decoding give the reference answer? one teacher-forced forward says
    modes.py       one mode's measurements: loss, exact greedy accuracy, general text, paired intervals
    sandbox.py     where model-written code runs: limits, no network, confined writes
    isolation.py   the sandbox's layers inside the child: namespaces, mounts, init, uid, audit hook
  rl/            RL on a domain's last stack after SFT, before it is frozen
    objectives.py  DPO, GRPO and REINFORCE by hand; the reference is the model with its active stack off
    rewards.py     rewards that are the evaluation's checks (math, reasoning, ICD codes, HumanEval tests)
    samples.py     DPO pairs from the corpora, GRPO groups from the KV-cache generator
    guard.py       the blow-up guard; loop.py the loop, its before and after, the last good stack restored
  psn/           PSN v2's capability blocks: blocks.py (MoE projections, the wiring), model.py (a frozen
                 base with blocks beside it), train.py (blocks in order, kept out of each other's directions)
  report/
    findings.py    the paper's findings beside ours, with generated verdicts: report.md's first table
    report.py      report.md, every comparison sentence generated from the numbers it compares
    evaluation.py  report.md's evaluation section: every mode, general text, samples
    router.py      report.md's router section
    rl.py          report.md's RL section and its figure
    psn.py         PSN's section and figures (v1 and v2)
    plots.py       the figures
    paper.py       every number quoted from the paper, in one place
  presets.py     Preset, the smoke / quick / paper presets, the evaluation's config, a Preset's record
  run.py         a run folder that describes itself: its paths, its Preset, and the one loader
  stages/        the work of each command: (Preset, run folder) -> JSON, resumable
    common.py      arguments, folder checks, a domain's data
    data.py  pretrain.py  compare.py  boost.py  continual.py (`train`)  route.py  evaluate.py (`eval`)
    generate.py  chat.py  rl.py  psn.py  repair.py  demo.py
  bench/         speed measurements: timing.py (the one timing loop), one file per benchmark, command.py
  __main__.py    the command line: a table of commands, each a stage module's add_args and main

docs/brainstacks.md is the reference beside the code: the paper's numbers, where its released code
differs, and what ministacks does by default and why; "§N" in a docstring is its section N.
"""

__version__ = "0.1.0"
