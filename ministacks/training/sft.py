"""The one stack-training loop every experiment shares, and residual boosting on top of it (docs/brainstacks.md §3).

One round trains one fresh stack on one domain, over a frozen base and frozen earlier stacks:

    loss   = CE(next token) + λ · Σ_layers L_aux          (λ = 0.01; L_aux from every MoE-LoRA)
    opt    = AdamW(β 0.9/0.95, weight decay 0.01) on the active stack only, grad-norm clip 1.0
    lr(t)  = lr · t/warmup for t < warmup (40 steps), then linear decay to 0

The best-stack guard (the paper's BestStackCallback, with our two fixes, docs/brainstacks.md §3): evaluate every
`eval_every` steps; keep a snapshot of the best validation loss; stop the round on a spike
(`val − best > 0.1`) or after 4 evaluations without improvement; restore the best snapshot at the
end. "Best" starts at the pre-round loss with the zero-init snapshot — so a round that only makes
things worse restores the identity (the released code starts at +inf and can never do that).

Residual boosting (docs/brainstacks.md §3): rounds on one domain, each adding a fresh stack on top of the frozen
ones; stop when a round after the first improves by less than 0.002. A round's stack is kept even
when it stops the loop.

The data a round reads and the one loss every stage measures are in examples.py.

Every stack has its own seed (`stack_seed`), a function of the run's seed and of how many stacks the
model already holds frozen: it seeds the stack's initialisation (the A matrices and routers), its
routing noise and its data order. Two domains' first stacks therefore start from different A matrices,
and two rounds of one domain see different batches; the runs an experiment compares (MoE vs LoRA on a
fresh base, with and without null-space) get the same seed for the same stack, and a resumed run gets
the seed it had. The seed is recorded in the round's result (and so in the stack's manifest record).

A round's checkpoint names the round it belongs to (stack index, seed, round index and whatever the
caller adds, e.g. the domain) and is refused by any other round: resuming from another round's
checkpoint would silently train (or duplicate) the wrong stack.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..checkpoint import load_latest, optimizer_from_tensors, save_checkpoint
from ..runtime import process_group
from ..stacks.layer import add_stack, aux_loss, freeze_active, stacked_layers
from .examples import PackedExamples



@dataclass(frozen=True)
class StackTrainConfig:
    steps: int = 400  # optimizer steps per round (paper: TinyLlama 400, Gemma 500)
    batch_size: int = 16  # paper: 16
    seq_len: int = 256  # packed window length (paper: 512; our base's context is 256)
    lr: float = 2e-4  # paper: 2e-4 TinyLlama, 1e-4 Gemma
    warmup_steps: int = 40  # paper: 40, then linear decay
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    aux_weight: float = 0.01  # λ for the load-balance loss
    eval_every: int = 50  # paper: 50
    spike: float = 0.1  # stop when val − best exceeds this
    patience: int = 4  # stop after this many evaluations without improvement
    guard: bool = True  # False: run every step (Exp 1 compares full curves)
    completion_only: bool = False  # score only the response tokens (training and validation)
    max_val_examples: int = 200  # validation examples per evaluation (paper's n = 200)
    eval_batch_size: int = 32
    seed: int = 0  # the run's seed; each stack's own is stack_seed(seed, stacks already frozen)


# -- one round -------------------------------------------------------------------------------------

# Room for this many stacks per run seed: stack_seed(s, n) never meets stack_seed(s', n') for s != s'
# while n, n' stay below it (a continual run holds tens of stacks; the paper's Gemma run 10).
STACKS_PER_SEED = 10_000


def stack_seed(base_seed: int, stack_index: int) -> int:
    """The seed of a run's stack number `stack_index` (0 = the first stack the model holds):

        seed = base_seed · STACKS_PER_SEED + stack_index

    It seeds the stack's initialisation, its routing noise and its data order (`PackedExamples.batch`).
    Distinct for every stack of a run, because the index only grows; deterministic, so a resumed run
    gets the same seed; and the same for the same stack of two runs that are compared (MoE vs LoRA
    both start on a fresh base: index 0). The released code's rule, 42 + round + 7 × stacks so far,
    has the same purpose but repeats a seed once a domain has more than 7 rounds."""
    if not 0 <= stack_index < STACKS_PER_SEED:
        raise ValueError(f"stack_index={stack_index} must be in [0, {STACKS_PER_SEED}): raise STACKS_PER_SEED "
                         "in ministacks/training/sft.py for runs with more stacks")
    return base_seed * STACKS_PER_SEED + stack_index


def frozen_stack_count(model: nn.Module) -> int:
    """How many stacks the model holds frozen (every StackedLinear holds the same ones; the first is asked)."""
    layer = next(stacked_layers(model), None)
    if layer is None:
        raise ValueError("the model has no stacked layers: call stacks.layer.inject_stacks(model) first")
    return sum(len(s) for s in layer.stacks.values())


class CheckpointMismatchError(ValueError):
    """A round's checkpoint folder holds the checkpoint of another round."""


@dataclass
class RoundResult:
    pre_loss: float  # validation loss before the round (earlier stacks on)
    best_loss: float  # after restoring the best snapshot
    val_curve: list[list[float]] = field(default_factory=list)  # [[step, loss], ...], step 0 = pre_loss
    best_step: int = 0  # 0 = the zero-init snapshot (identity) was best
    stop_reason: str = "steps"  # "steps", "spike" or "patience"
    steps_run: int = 0
    seconds_per_step: float = 0.0
    params: int = 0
    stack_index: int = 0  # stacks the model already held frozen when this one was added
    seed: int = 0  # stack_seed(cfg.seed, stack_index): initialisation, routing noise, data order

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def lr_factor(step: int, cfg: StackTrainConfig) -> float:
    """lr(t) / lr: (t + 1)/warmup for t < warmup, then (steps − t)/(steps − warmup), reaching 0 at t = steps.

    A pure function of the step number, so a resumed round needs no scheduler state to continue on it."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup_steps))


def snapshot_active(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """A copy of the active stack: one state_dict per stacked layer, in `stacked_layers` order.

    Deep-copied because state_dict() hands back the live parameters, which AdamW updates in place: an
    uncopied snapshot would follow training instead of keeping the step it was taken at."""
    return [copy.deepcopy(layer.active.state_dict()) for layer in stacked_layers(model)]


def restore_active(model: nn.Module, snap: list[dict[str, torch.Tensor]]) -> None:
    """Load a `snapshot_active` back into the active stack (same model, so the same layer order)."""
    for layer, sd in zip(stacked_layers(model), snap):
        layer.active.load_state_dict(sd)


def flatten_snapshot(prefix: str, snap: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A snapshot as the flat {name: tensor} safetensors stores, names `prefix.layer.key`: the prefix keeps
    the active stack ("active") and the best snapshot ("best") apart in one checkpoint file."""
    return {f"{prefix}.{i}.{k}": v for i, sd in enumerate(snap) for k, v in sd.items()}


def unflatten_snapshot(prefix: str, tensors: dict[str, torch.Tensor], n_layers: int) -> list[dict[str, torch.Tensor]]:
    """The inverse of `flatten_snapshot` for one prefix; the file's other tensors (the other prefix, "rng") are skipped."""
    snap: list[dict[str, torch.Tensor]] = [{} for _ in range(n_layers)]
    for name, v in tensors.items():
        if name.startswith(prefix + "."):
            i, k = name[len(prefix) + 1 :].split(".", 1)
            snap[int(i)][k] = v
    return snap


def stack_step(model: nn.Module, params: list[nn.Parameter], opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, cfg: StackTrainConfig,
               after_step: Callable[[nn.Module], None] | None = None) -> torch.Tensor:
    """One optimizer step on the active stack: loss = CE + λ·Σ L_aux, clip, AdamW, then `after_step`.
    Returns the task loss (CE alone), the number comparable with the validation loss."""
    # the forward leaves each layer's L_aux on the layer (layer.py says why); aux_loss sums them
    task = model(x, labels=y).loss
    loss = task + cfg.aux_weight * aux_loss(model)
    opt.zero_grad(set_to_none=True)
    loss.backward()  # gradients reach the active stack only: the base and frozen stacks have requires_grad off
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)  # the active stack's own gradient norm
    opt.step()
    # after the optimizer, so that the strict null-space projection (projection.py) acts on B as AdamW left
    # it, and every snapshot the guard takes is of an already-projected stack
    if after_step is not None:
        after_step(model)
    return task


def train_round(
    model: nn.Module,
    make_adapter: Callable[[int, int], nn.Module],
    train: PackedExamples,
    val_loss: Callable[[], float],
    cfg: StackTrainConfig,
    progress: bool = True,
    desc: str = "round",
    after_step: Callable[[nn.Module], None] | None = None,
    round_index: int = 0,
    ckpt_dir: str | Path | None = None,
    owner: dict | None = None,
) -> RoundResult:
    """Add a fresh active stack and train it with the best-stack guard; the best snapshot stays active.

    Data-parallel when a torch.distributed process group of more than one process is initialised (torchrun:
    scale/ddp.py): every process holds the model and builds the same fresh stack (the same seed), draws the
    same global batch (a function of the seed and the step) and takes its share of the rows, and DDP averages
    the active stack's gradients before AdamW, so every process takes the same step. Validation runs whole in
    every process (the same stack, the same examples: the same loss, so the guard decides alike everywhere);
    only the first process writes checkpoints.

    `val_loss()` evaluates the model as it is (usually `example_loss` on the domain's validation set);
    `after_step(model)` runs after every optimizer step (the null-space projection's strict mode).
    The stack's seed is `stack_seed(cfg.seed, frozen_stack_count(model))`.
    With `ckpt_dir`, the round checkpoints at every evaluation (active stack, best snapshot, optimizer,
    guard state, RNG) and a call on the same folder resumes it, ending exactly as an uninterrupted round.
    The checkpoint records which round it is — stack index, seed, `round_index` and the caller's `owner`
    (JSON, e.g. {"domain": "code", "round": 2}) — and a call for any other round refuses it with
    CheckpointMismatchError rather than train the wrong stack.
    """
    stack_index = frozen_stack_count(model)
    seed = stack_seed(cfg.seed, stack_index)
    # Seeded here, before add_stack draws the A matrices and routers: the stack then depends on its own
    # seed, not on what earlier work in this process (an earlier round's routing noise) left in torch's
    # generator, so a fresh process resuming the run builds the same stack. The routing noise draws from
    # the same generator; the data order takes `seed` explicitly.
    torch.manual_seed(seed)
    identity = {**(owner or {}), "round_index": round_index, "stack_index": stack_index, "seed": seed}
    # The checkpoint's identity is checked before anything else: a refused checkpoint then costs no
    # validation pass and leaves the model exactly as it was passed in (no stack added).
    ckpt = load_latest(ckpt_dir) if ckpt_dir is not None else None
    if ckpt is not None and ckpt.state.get("identity") != identity:
        theirs = ckpt.state.get("identity") or "no round (written by an older ministacks)"
        raise CheckpointMismatchError(
            f"{Path(ckpt_dir)} holds the checkpoint of {theirs}, not of the round being trained now ({identity}): "
            f"resuming from it would train the wrong stack. Delete {Path(ckpt_dir)} to train this round afresh")
    # Measured before the stack is added (a fresh stack is the identity, so it would make no difference).
    # Resuming, the model under the new stack is the one the checkpoint measured: its number is read back,
    # and a finished round resumes without a single evaluation.
    pre = ckpt.state["result"]["pre_loss"] if ckpt else val_loss()
    params = add_stack(model, make_adapter)
    layers = list(stacked_layers(model))
    result = RoundResult(pre_loss=pre, best_loss=pre, val_curve=[[0, pre]], params=sum(p.numel() for p in params),
                         stack_index=stack_index, seed=seed)
    # "Best" starts at the pre-round loss, paired with a snapshot of the fresh stack, whose B matrices are
    # zero: an exact identity. A round none of whose evaluations beats `pre` restores that snapshot and so
    # leaves the model as it found it; the released code starts at +inf and cannot (docs/brainstacks.md §3).
    best_snap, bad, seconds, start, finished = snapshot_active(model), 0, 0.0, 0, False
    # AdamW holds the active stack alone: the base and the frozen stacks never move (docs/brainstacks.md §2,
    # §4) by construction, and its two moments per parameter cost one stack's memory and checkpoint space,
    # however many stacks the model holds.
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    rank, size = process_group()
    if cfg.batch_size % size:
        raise ValueError(f"the batch of {cfg.batch_size} rows does not split over {size} processes")
    rows = slice(rank * cfg.batch_size // size, (rank + 1) * cfg.batch_size // size)  # this process's share
    # the base is loaded alike in every process: nothing to broadcast each step but the gradients; a router's
    # top-k can leave an expert out of a step's graph, which DDP must be told it may
    net = (DistributedDataParallel(model, broadcast_buffers=False, find_unused_parameters=True)
           if size > 1 else model)
    if ckpt is not None:
        # the loop's state at the last evaluation, loaded into the stack just added (its fresh init is
        # overwritten): the stack then, the best snapshot, AdamW's moments, the generator, the guard
        restore_active(model, unflatten_snapshot("active", ckpt.model, len(layers)))
        best_snap = unflatten_snapshot("best", ckpt.model, len(layers))
        optimizer_from_tensors(opt, *ckpt.optimizer)
        # torch's CPU generator: routing noise drawn on the CPU continues as if never interrupted
        torch.set_rng_state(ckpt.model["rng"])
        result = RoundResult(**ckpt.state["result"])
        bad, seconds, start, finished = (ckpt.state["bad"], ckpt.state["seconds"], ckpt.state["step"],
                                         ckpt.state["finished"])

    def checkpoint(step: int, done: bool) -> None:
        """All the loop needs to continue after `step` (the data order needs nothing: it is a function of
        (seed, step)). `done`: the round has ended, stopped by the guard or at its last step; resuming a
        done round runs no step and no evaluation, it restores the best snapshot and returns the result."""
        if ckpt_dir is None or rank != 0:  # one writer: every process holds the same state
            return
        tensors = {**flatten_snapshot("active", snapshot_active(model)), **flatten_snapshot("best", best_snap), "rng": torch.get_rng_state()}
        state = {"identity": identity, "result": result.to_dict(), "bad": bad, "seconds": seconds, "finished": done}
        save_checkpoint(ckpt_dir, step, tensors, opt, state)

    model.train(True)  # routing noise on in the active stack; frozen stacks stay in eval mode (layer.py)
    bar = tqdm(range(start, cfg.steps), desc=desc, disable=not progress or finished, dynamic_ncols=True, leave=False)
    for step in [] if finished else bar:
        t0 = time.perf_counter()
        # lr from the step number (no scheduler object): a resumed round is on the same schedule, exactly
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, cfg)
        x, y = train.batch(step, cfg.batch_size, seed)  # the stack's own data order, a function of (seed, step)
        task = stack_step(net, params, opt, x[rows], y[rows], cfg, after_step)
        # Only the training step is timed, not evaluations or checkpoints: seconds_per_step then compares
        # runs with any eval_every, with or without checkpoints (Exp 1 compares MoE-LoRA and LoRA per step).
        seconds += time.perf_counter() - t0
        result.steps_run = step + 1
        bar.set_postfix(loss=f"{task.item():.3f}", best=f"{result.best_loss:.3f}")
        # An evaluation is a whole validation pass (up to max_val_examples examples), so it runs every
        # eval_every steps (paper: 50), and at the last step, so that the stack as trained to the end is a
        # candidate for "best" and the curve ends where training did.
        if (step + 1) % cfg.eval_every and step + 1 != cfg.steps:
            continue
        v = val_loss()
        model.train(True)  # val_loss is the caller's: it may leave the model in eval mode
        result.val_curve.append([step + 1, v])
        if v < result.best_loss:  # strictly lower: on a tie the earlier snapshot stays
            result.best_loss, result.best_step, best_snap, bad = v, step + 1, snapshot_active(model), 0
        else:
            bad += 1  # evaluations since the last improvement
        # The guard (docs/brainstacks.md §3). A spike, the loss more than `spike` above the best, means the
        # round has gone wrong (a divergent step): it stops at once instead of training on from a bad stack.
        # Patience stops a round that has stopped improving (a plateau, or overfitting the domain) after
        # `patience` evaluations without a new best. As "best" starts at the pre-round loss, a spike is caught
        # from the first evaluation. guard=False only switches the two rules off: the best snapshot is still
        # restored.
        if cfg.guard and v - result.best_loss > cfg.spike:
            result.stop_reason = "spike"
        elif cfg.guard and bad >= cfg.patience:
            result.stop_reason = "patience"
        stopping = result.stop_reason != "steps" or step + 1 == cfg.steps
        result.seconds_per_step = seconds / max(1, result.steps_run)  # the checkpointed result carries it too
        # A checkpoint at every evaluation, the only place the guard's state changes: a kill loses at most
        # eval_every steps, and the step-by-step cost of copying two stacks and AdamW's moments is avoided.
        checkpoint(step + 1, done=stopping)
        if stopping:
            break
    bar.close()
    # The stack left active (the one boost_domain freezes) is the best, not the last: its validation loss
    # is result.best_loss, and when best_step is 0 it is the zero-init identity.
    restore_active(model, best_snap)
    model.train(False)
    result.seconds_per_step = seconds / max(1, result.steps_run)  # training time only, summed across resumes
    return result


# -- residual boosting -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BoostConfig:
    max_rounds: int = 3  # paper: TinyLlama up to 3, Gemma 2 per domain
    min_improvement: float = 0.002  # a round after the first must improve the domain's loss by this


def boosting_stops(round_index: int, prev_best: float, best: float, boost: BoostConfig) -> bool:
    """The stop rule: a round after the first that improves the domain's loss by less than min_improvement."""
    return round_index > 0 and prev_best - best < boost.min_improvement


def boosting_done(best_losses: Sequence[float], boost: BoostConfig) -> bool:
    """Has a domain whose rounds so far reached `best_losses` finished boosting? Either a round stopped
    the loop (the stop rule) or `boost.max_rounds` rounds are trained. A resumed run replays its saved
    rounds through this, so it continues exactly where an uninterrupted loop would be."""
    prev = math.inf
    for r, best in enumerate(best_losses):
        if boosting_stops(r, prev, best, boost):
            return True
        prev = best
    return len(best_losses) >= boost.max_rounds


def boost_domain(
    model: nn.Module,
    domain: str,
    make_adapter: Callable[[int, int], nn.Module],
    train: PackedExamples,
    val_loss: Callable[[], float],
    cfg: StackTrainConfig,
    boost: BoostConfig = BoostConfig(),
    progress: bool = True,
    after_step: Callable[[nn.Module], None] | None = None,
    saved: Sequence[float] = (),
    ckpt_dir: str | Path | None = None,
    after_round: Callable[[int, RoundResult], None] | None = None,
    before_freeze: Callable[[int, RoundResult], None] | None = None,
) -> list[RoundResult]:
    """Residual boosting on one domain: the one loop `boost` and the continual run share.

        while not boosting_done(rounds so far):
            train_round: a fresh stack on top of the frozen ones (its own seed, its own batches)
            before_freeze(r, result)          the domain's last round only: RL on its still-active
                                              stack (Algorithm 2, line 4; the continual run's --rl)
            freeze it under `domain`          kept even if it is the round that stops the loop
            after_round(r, result)            the caller's hook: the continual run saves the stack and
                                              its manifest entry here, before the next round starts

    `saved`: the best losses of the domain's rounds already trained and frozen in `model` (a resumed
    run); the loop continues after them. With `ckpt_dir`, each round checkpoints there and resumes
    from it after a kill (train_round), its identity being (domain, round). Returns the new rounds."""
    best = list(saved)
    rounds: list[RoundResult] = []
    while not boosting_done(best, boost):
        r = len(best)
        res = train_round(model, make_adapter, train, val_loss, cfg, progress, desc=f"{domain} round {r + 1}",
                          after_step=after_step, round_index=r, ckpt_dir=ckpt_dir,
                          owner={"domain": domain, "round": r + 1})
        # the last round is known once its result is: the stop rule or the round budget ends the loop here
        if before_freeze is not None and boosting_done(best + [res.best_loss], boost):
            before_freeze(r, res)
        freeze_active(model, domain)
        if after_round is not None:
            after_round(r, res)
        best.append(res.best_loss)
        rounds.append(res)
    return rounds
