"""Pretraining the base model from random initialisation (the ground every stack stands on).

Brainstacks adapts a *pretrained* base: LoRA corrections refine an existing geometry and cannot
build one (the paper's PSN v1 finding, docs/brainstacks.md §8). The paper starts from TinyLlama / Gemma; on a
laptop we pretrain our own small LLaMA-style model on the general corpus — raw text of every
domain's training examples, never a validation or test example.

The recipe (nanoGPT-style):
    loss   = mean cross-entropy of next-token prediction over random windows of the token stream
    lr(t)  = lr · (t + 1) / warmup                             for t < warmup
           = lr · (m + (1 − m) · ½(1 + cos(π · progress)))      afterwards, m = min_lr_ratio
    update = AdamW(β1, β2, weight decay) after clipping the gradient norm to `grad_clip`

Exact resume: the batch of step t is a pure function of (seed, t), the learning rate a pure function
of t, and model + optimizer state are checkpointed (safetensors) — so a run killed at any point and
started again ends with bit-for-bit the same weights as one that was never interrupted.

This file implements the data (document split, packing, the windows of each step, the fixed
validation windows), the schedule, the optimizer, `evaluate`, `pretrain` itself and
`check_out_folder`, which runs before anything is written: a checkpoint of another configuration, or
a base / trained stacks without checkpoints and of another configuration, is refused untouched. What
`pretrain` leaves behind, the base on disk with its checked record, is base.py's.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoint import load_latest, optimizer_from_tensors, save_checkpoint
from ..runtime import training_state
from ..io import RunFileError, seed_everything
from .base import recorded_run_config, save_base
from .model import ModelConfig, Transformer
from .tokenizer import Tokenizer

# where a run folder's trained stacks can be: `train --out D`, and the demo's two continual runs
RUN_MANIFESTS = ("manifest.json", "nullspace/manifest.json", "no_nullspace/manifest.json")


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 240  # optimizer steps; quick preset ≈ 1M tokens, a few minutes on 2 cores
    batch_size: int = 16  # sequences per step
    seq_len: int = 256  # tokens per sequence (the model's context)
    lr: float = 2e-3  # peak learning rate; small models tolerate a high one
    min_lr_ratio: float = 0.1  # cosine decays to lr · min_lr_ratio
    warmup_steps: int = 20  # linear warmup: lr · (t + 1) / warmup_steps
    weight_decay: float = 0.1  # AdamW, applied to matrices only (not norms)
    beta1: float = 0.9
    beta2: float = 0.95  # the LLaMA / paper value
    grad_clip: float = 1.0  # max global grad norm
    eval_every: int = 40  # steps between validation passes
    eval_batches: int = 8  # validation windows = eval_batches · batch_size (fixed, deterministic)
    ckpt_every: int = 40  # steps between checkpoints (and always at the end)
    val_fraction: float = 0.05  # share of general-corpus documents held out for pretraining validation
    seed: int = 0
    samples_per_domain: int = 2  # greedy samples per domain in pretrain.json / the report
    sample_tokens: int = 48  # new tokens per sample
    repetition_penalty: float = 1.2  # the paper's decoding setting
    # share of the corpus's documents (train examples only) given in the Alpaca template instead of as raw
    # text, so the base knows the template as the paper's instruction-tuned bases do (data/general.py).
    # Measured on the quick preset: the base's all-token chat validation loss is 6.36 at 0 (the template
    # alone is most of it) and 2.05 at 0.5, its response-only loss 5.66 and 5.63 (the responses are
    # unchanged), so a domain's first stack then learns the domain, not the template
    template_share: float = 0.5


# -- data ------------------------------------------------------------------------------------------


def split_documents(docs: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out a deterministic share of documents for pretraining validation."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(docs), generator=g).tolist()
    n_val = max(1, int(len(docs) * val_fraction))
    return [docs[i] for i in order[n_val:]], [docs[i] for i in order[:n_val]]


def token_stream(tok: Tokenizer, docs: Sequence[str]) -> torch.Tensor:
    """Concatenate `<bos> doc <eos>` for every document into one flat int64 stream (packing)."""
    ids = tok.encode_batch(docs, bos=True, eos=True)
    return torch.tensor([t for seq in ids for t in seq], dtype=torch.long)


def window_starts(n_tokens: int, step: int, batch_size: int, seq_len: int, seed: int) -> list[int]:
    """Start offsets of the random windows of step `step`: a pure function of (seed, step), which makes
    resume exact and gives every run compared on the same data the same data order."""
    if n_tokens <= seq_len:
        raise ValueError(f"token stream of {n_tokens} tokens is shorter than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n_tokens - seq_len, (batch_size,), generator=g).tolist()


def get_batch(stream: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """Random windows [batch_size, seq_len] of a packed token stream."""
    return torch.stack([stream[s : s + seq_len] for s in window_starts(len(stream), step, batch_size, seq_len, seed)])


def val_windows(stream: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:
    """The first n non-overlapping windows of the validation stream (fewer if it is short)."""
    n = max(1, min(n, len(stream) // seq_len))
    return stream[: n * seq_len].view(n, seq_len)


def unigram_entropy(stream: torch.Tensor, vocab_size: int) -> float:
    """H = −Σ p log p (nats) of token frequencies: the loss of a model that ignores all context."""
    p = torch.bincount(stream, minlength=vocab_size).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


# -- training --------------------------------------------------------------------------------------


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: Transformer, cfg: PretrainConfig) -> torch.optim.AdamW:
    # weight decay on matrices only: decaying norm gains towards 0 would fight the normalisation
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


@torch.no_grad()
def evaluate(model: Transformer, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over fixed validation windows (token-weighted)."""
    total, count = 0.0, 0
    with training_state(model, False):
        for i in range(0, len(windows), batch_size):
            x = windows[i : i + batch_size]
            out = model(x, labels=x)
            n = x.numel() - x.shape[0]  # T-1 predictions per row
            total += float(out.loss) * n
            count += n
    return total / count


@dataclass
class PretrainResult:
    model: Transformer
    tokenizer: Tokenizer
    summary: dict


def pretrain(
    model_cfg: ModelConfig,
    cfg: PretrainConfig,
    tok: Tokenizer,
    docs: Sequence[str],
    out: str | Path,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> PretrainResult:
    """Pretrain (or resume) a base model in `out`; returns the final model and a JSON-able summary.

    Writes `out/base/model.safetensors` + `out/base/config.json` + `out/tokenizer.json` (the base every
    later stage loads, see base.py) and `out/checkpoints/` while running. `on_step(step)` is called
    after each optimizer step (tests use it to simulate a kill).
    """
    out = Path(out)
    # this run's configuration, kept in every checkpoint and in base/config.json: resuming under another is refused
    run_config = {"model": model_cfg.to_dict(), "pretrain": asdict(cfg), "tokenizer": tok.fingerprint()}
    ckpt = load_latest(out / "checkpoints")
    check_out_folder(out, run_config, ckpt)  # before anything is written: a refused run changes nothing
    out.mkdir(parents=True, exist_ok=True)
    # the global RNG serves the random init only (batches have their own generator, the model has no
    # dropout): a fresh start is then a function of the seed too, and no RNG state needs checkpointing
    seed_everything(cfg.seed)
    tok.save(out / "tokenizer.json")

    # re-tokenized on every start rather than checkpointed: the split and the packing are pure
    # functions of (docs, tokenizer, seed), so a resumed run sees the very same token streams
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.seed)
    train_ids, val_ids = token_stream(tok, train_docs), token_stream(tok, val_docs)
    # fixed validation windows, not random ones: every point of the val curve is measured on the same
    # tokens, so its movement is the model's and not sampling noise, and a resumed curve equals an
    # uninterrupted one
    windows = val_windows(val_ids, cfg.eval_batches * cfg.batch_size, cfg.seq_len)
    entropy = unigram_entropy(train_ids, tok.vocab_size)

    model = Transformer(model_cfg)
    opt = make_optimizer(model, cfg)
    # the loop's own state: whatever a resume needs beyond weights and optimizer to end where an
    # uninterrupted run ends (its curves and timings go into the summary)
    state = {"val_curve": [], "train_curve": [], "train_seconds": 0.0, "tokens_seen": 0}

    if ckpt is not None:
        # a resume restores the weights, AdamW's moments and step counts, and the loop state; the
        # learning rate and the batches need nothing restored, they follow from the step alone
        model.load_state_dict_from_save(ckpt.model)
        optimizer_from_tensors(opt, *ckpt.optimizer)
        state = {k: ckpt.state[k] for k in state}
        start = ckpt.state["step"]
    else:
        start = 0
        # the loss at random init: the curve's first point (a resumed run already has it)
        state["val_curve"].append([0, evaluate(model, windows, cfg.batch_size)])

    def checkpoint(step: int) -> None:
        # atomic (see checkpoint.py): a kill at any moment leaves latest.json naming a complete checkpoint,
        # so a restart resumes from the last one instead of from a half-written one, or from zero
        save_checkpoint(out / "checkpoints", step, model.state_dict_for_save(), opt, {**state, "config": run_config})

    model.train()
    bar = tqdm(total=cfg.steps, initial=start, desc="pretrain", disable=not progress, dynamic_ncols=True)
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        # warmup + cosine (module docstring): warmup because AdamW's second-moment estimates rest on a
        # handful of gradients in the first steps, and full-size updates on them can destabilise a random
        # init; cosine so the last steps settle at lr · min_lr_ratio instead of bouncing at the peak.
        # A function of the step alone, set afresh every step, so a resume is on the same schedule
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        # the windows of step t are a function of (seed, t): no data-loader position to save, and
        # steps replayed after a kill see exactly the batches they saw before
        x = get_batch(train_ids, step, cfg.batch_size, cfg.seq_len, cfg.seed)  # [B, T]
        loss = model(x, labels=x).loss  # labels = inputs: the model shifts them by one internally
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # one unlucky batch early on can give a gradient many times the usual size; clipping the
        # global norm bounds the step it causes without changing its direction
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        # time the training step only: validation and checkpoint writes below are not throughput
        dt = time.perf_counter() - t0
        state["train_seconds"] += dt
        state["tokens_seen"] += x.numel()
        state["train_curve"].append([step + 1, loss.item()])
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            state["val_curve"].append([done, evaluate(model, windows, cfg.batch_size)])
        # after the evaluation, so that the checkpoint's curve already holds this step's point
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            checkpoint(done)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{state['val_curve'][-1][1]:.3f}", tok_s=f"{x.numel() / dt:,.0f}")
        if on_step is not None:
            on_step(done)
    bar.close()

    model.eval()
    # written on every call, a resume of a finished run included: running `pretrain` again while the
    # final checkpoint is there repairs a damaged base (the fix base.base_fix suggests)
    save_base(out, model, run_config)
    # what pretrain.json and the report show. Curves and timings are the checkpointed ones carried
    # across resumes, so each step counts once (steps a kill undid are counted when they are redone)
    summary = {
        "val_loss": state["val_curve"][-1][1],
        "val_curve": state["val_curve"],  # [[step, loss on the fixed windows]], step 0 = random init
        "train_curve": state["train_curve"],  # [[step, loss of that step's batch, before its update]]
        "unigram_entropy": entropy,  # the loss of a model that ignores context: the bar to go below
        "tokens_per_second": state["tokens_seen"] / max(state["train_seconds"], 1e-9),
        "train_seconds": state["train_seconds"],
        "tokens_seen": state["tokens_seen"],
        "params": model.num_params(),
        "vocab_size": tok.vocab_size,
        "train_tokens": len(train_ids),
        "val_tokens": len(val_ids),
        "config": run_config,
    }
    return PretrainResult(model=model, tokenizer=tok, summary=summary)


def check_out_folder(out: Path, run_config: dict, ckpt) -> None:
    """Refuse to pretrain into `out` when that would replace a base of another configuration.

    With a checkpoint, it must be of this configuration (then pretraining resumes). Without one, a base
    or trained stacks already in `out` are refused unless base/config.json records this very
    configuration (then pretraining again is deterministic and rewrites the same base): stacks are
    corrections to one base, and a base pretrained under them would make them meaningless."""
    if ckpt is not None:
        if ckpt.state["config"] != run_config:
            raise ValueError(f"{out} holds a pretraining run with a different configuration; "
                             "use another --out folder, or delete this one to start over")
        return
    held = [name for name in ("base", *RUN_MANIFESTS) if (out / name).exists()]
    if not held:
        return
    try:
        recorded = recorded_run_config(out / "base" / "config.json")
    except RunFileError:
        recorded = None  # unreadable: nothing says it is this configuration
    if recorded is not None and recorded == json.loads(json.dumps(run_config)):
        return
    raise ValueError(f"{out} already holds {', '.join(held)} but no pretraining checkpoints of this "
                     "configuration: pretraining here would replace the base its stacks were trained on. "
                     "Use another --out folder")
