"""RL on a domain's last stack, after its SFT rounds and before it is frozen (Algorithm 2, line 4; §8 of
docs/brainstacks.md).

    pairs or prompts     DPO: (true reply, another reply) pairs of the domain's training split (samples.py);
                         GRPO / REINFORCE: its training prompts that a reward can check (rewards.py) and
                         whose reference answer fits in max_new_tokens (the short-answer tasks)
    before               the measure on the validation split: DPO the pair accuracy (the true reply more
                         likely per token than the other one), GRPO the greedy answers' reward; and the domain's
                         validation loss (the caller's `val_loss`, SFT's)
    for step in 1..steps
        DPO              a batch of pairs, dpo_loss against the reference (objectives.py)
        GRPO             P prompts x G samples, rewards, group advantages, `inner_steps` clipped updates
        REINFORCE        the same groups, one on-policy update of −(r − mean) log π
                         (no group's rewards vary: every advantage and the gradient are 0, so no update —
                         AdamW would otherwise keep moving the stack on the moments of earlier steps)
        guard            non-finite or jumping loss / gradient norm / reward: restore the last good
                         stack and stop (guard.py); else AdamW on the active stack alone
    after                the same measures, on the same examples

Decisions the paper leaves open, and ours:
- The reference is the model with the active stack switched off (objectives.active_off): the base and
  every frozen stack, which is what the active stack's SFT rounds started from. DPO's β = 0.1 (TRL's).
- Every forward runs in eval mode: the routing noise of the MoE-LoRA experts is off, so the sampler and
  the learner are one distribution (ρ = 1 exactly at the first update) and no auxiliary load-balance
  loss is added: SFT set the balance, and RL's few steps leave it.
- GRPO: G = 8 completions per prompt at temperature 0.7: at 1.0 the miniature's samples are almost never
  right where its greedy answers are right a fifth of the time (measured on the quick reasoning stack:
  every group's rewards equal, nothing to learn), so the groups are drawn nearer the greedy answer; the
  log-probs in the ratio are the policy's own (temperature 1), for the old and the new policy alike. Two
  updates per sampled batch (so the ratio leaves 1 and the clip ε = 0.2 can bind); tokens averaged by "bnpo" (every
  completion token weighs the same: no length bias, objectives.average_tokens).
- No KL by default (β = 0, TRL's default; `kl_beta` turns the k3 term on): our reference is the model
  before the domain's SFT stack, so a KL to it pulls the stack back toward doing nothing (measured: the
  KL starts at ~0.17 nats per token on the quick reasoning stack, all of it SFT's work).
- Learning rate: constant 3e-4, a third of SFT's (1e-3 at quick): RL moves a stack that is already trained.
- A step's data is a function of (seed, step), and the checkpoint holds the stack, the last good stack,
  AdamW's moments, the curves and the guard's history, so a killed run resumes to the same result.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..checkpoint import load_latest, optimizer_from_tensors, save_checkpoint
from ..data.example import Example
from ..evaluation.tasks import wilson_interval
from ..lm.tokenizer import Tokenizer
from ..runtime import training_state
from ..stacks.layer import active_parameters, stacked_layers
from ..training.sft import (CheckpointMismatchError, flatten_snapshot, restore_active, snapshot_active,
                             unflatten_snapshot)
from .guard import BlowUpGuard, GuardConfig
from .objectives import (LOSS_TYPES, active_off, dpo_loss, dpo_metrics, group_advantages, grpo_loss, reinforce_loss,
                         sequence_logps, token_logps, variance_share)
from .rewards import reward_for, rewardable
from .samples import (NonFinitePolicy, Pair, batch_of, greedy_replies, pair_batch, reply_pairs, sample_groups,
                      sampled_pairs, text_of)

METHODS = ("dpo", "grpo", "reinforce")
NO_SIGNAL = "no signal"  # a step's stand-in for a loss when no group's rewards vary (GRPO without KL, REINFORCE)


@dataclass(frozen=True)
class RLConfig:
    steps: int = 30  # RL steps: one batch of pairs, or one set of sampled groups, each
    lr: float = 3e-4  # constant (module docstring)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # as SFT
    pairs_per_step: int = 8  # DPO
    beta: float = 0.1  # DPO's β (TRL's default)
    rejected: str = "other"  # DPO's rejected reply: "other" (another prompt's) or "sample" (the policy's own)
    prompts_per_step: int = 4  # GRPO / REINFORCE: P prompts ...
    group: int = 8  # ... x G sampled completions each
    temperature: float = 0.7  # module docstring
    top_k: int | None = None
    # a completion's budget; prompts whose reference is longer are not used (reasoning at 48: letter counting,
    # family relations, bit counts, syllogisms; math at 48: the arithmetic, not the word problems)
    max_new_tokens: int = 48
    inner_steps: int = 2  # GRPO updates per sampled batch (μ); 1 = on-policy, the clip never binds
    epsilon: float = 0.2  # GRPO's clip
    kl_beta: float = 0.0  # GRPO's KL weight (0: no reference forward; module docstring)
    loss_type: str = "bnpo"  # objectives.average_tokens
    n_eval: int = 40  # validation pairs / prompts of the before-and-after measure
    eval_every: int = 10  # steps between measures (the curve); the last step is always measured
    ckpt_every: int = 5
    seed: int = 0  # combined with the stack's own seed
    guard: GuardConfig = field(default_factory=GuardConfig)

    def check(self, method: str) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown RL method {method!r}: use one of {', '.join(METHODS)}")
        if self.rejected not in ("other", "sample"):
            raise ValueError(f"RLConfig.rejected is {self.rejected!r}: use 'other' or 'sample'")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"RLConfig.loss_type is {self.loss_type!r}: use one of {', '.join(LOSS_TYPES)}")


def _batch_at(n: int, step: int, size: int, seed: int) -> list[int]:
    """The step's `size` indices into n items: consecutive slices of a seeded shuffle, reshuffled per pass."""
    out = []
    for k in range(step * size, (step + 1) * size):
        epoch, pos = divmod(k, n)
        order = list(range(n))
        random.Random(seed * 7919 + epoch).shuffle(order)
        out.append(order[pos])
    return out


class Aligner:
    """One RL run on the active stack of `model` (module docstring); `run()` returns its result."""

    def __init__(self, model: nn.Module, tok: Tokenizer, domain: str, method: str, train: Sequence[Example],
                 val: Sequence[Example], val_loss: Callable[[], float], cfg: RLConfig, seed: int = 0):
        cfg.check(method)
        if next(stacked_layers(model)).active is None:
            raise RuntimeError("RL trains the active stack: the model has none")
        self.model, self.tok, self.domain, self.method, self.cfg = model, tok, domain, method, cfg
        self.seed, self.val_loss = cfg.seed * 1_000_003 + seed, val_loss
        self.max_len = model.cfg.max_seq_len
        if method == "dpo":
            if cfg.rejected == "sample":
                self.pairs = sampled_pairs(model, tok, train[: 4 * cfg.pairs_per_step * cfg.steps], self.max_len,
                                           cfg.max_new_tokens)
            else:
                self.pairs = reply_pairs(tok, train, self.max_len, self.seed)
            self.val_pairs = reply_pairs(tok, val, self.max_len, self.seed)[: cfg.n_eval]
            if not self.pairs or not self.val_pairs:
                raise ValueError(f"no DPO pairs of {domain} fit in the model's {self.max_len}-token context")
        else:
            self.reward = reward_for(domain)
            short = [ex for ex in train if self._usable(ex)]
            self.prompts, self.val_prompts = short, [ex for ex in val if self._usable(ex)][: cfg.n_eval]
            if not self.prompts or not self.val_prompts:
                raise ValueError(f"no {domain} example has a checkable answer of at most {cfg.max_new_tokens} tokens "
                                 "(RLConfig.max_new_tokens): nothing GRPO could be rewarded on")

    def _usable(self, ex: Example) -> bool:
        room = len(self.tok.encode(ex.response, eos=True))
        return (rewardable(self.domain, ex) and room <= self.cfg.max_new_tokens
                and len(self.tok.encode(ex.prompt(), bos=True)) + self.cfg.max_new_tokens <= self.max_len)

    # -- the measure before, during and after --------------------------------------------------------------
    @torch.no_grad()
    def measure(self) -> dict:
        if self.method == "dpo":
            batch = pair_batch(self.val_pairs, self.tok.pad_id)
            with training_state(self.model, False):
                # per token, the paper's choice rule: a summed log-prob mostly says which reply is shorter
                logps = sequence_logps(self.model, batch.ids, batch.completion) / batch.completion.sum(-1)
            P = len(self.val_pairs)
            hits = int((logps[:P] > logps[P:]).sum())
            name = "pair_accuracy"  # the true reply more likely per token than another prompt's
        else:
            replies = greedy_replies(self.model, self.tok, self.val_prompts, self.cfg.max_new_tokens, self.max_len)
            hits = int(sum(self.reward(ex.prompt(), r, ex) for ex, r in zip(self.val_prompts, replies)))
            P, name = len(self.val_prompts), "accuracy"  # the greedy answer's reward
        low, high = wilson_interval(hits, P)
        return {"measure": name, "accuracy": hits / P, "n": P, "ci95": [low, high], "val_loss": self.val_loss()}

    # -- one step ------------------------------------------------------------------------------------------
    def dpo_losses(self, step: int) -> list[tuple[torch.Tensor, dict, list[float]]]:
        pairs: list[Pair] = [self.pairs[i] for i in _batch_at(len(self.pairs), step, self.cfg.pairs_per_step, self.seed)]
        batch, P = pair_batch(pairs, self.tok.pad_id), len(pairs)
        with torch.no_grad(), active_off(self.model):
            ref = sequence_logps(self.model, batch.ids, batch.completion)
        logps = sequence_logps(self.model, batch.ids, batch.completion)
        out = dpo_loss(logps[:P], logps[P:], ref[:P], ref[P:], self.cfg.beta)
        return [(out.losses.mean(), dpo_metrics(out), [])]

    def group_losses(self, step: int):
        """GRPO's `inner_steps` losses (REINFORCE's one) on one sampled batch, computed lazily: each after the
        previous update, so the ratio of the second is to the policy the first update left."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(self.seed * 100_003 + step)
        chosen = [self.prompts[i] for i in _batch_at(len(self.prompts), step, cfg.prompts_per_step, self.seed)]
        try:
            groups = sample_groups(self.model, self.tok, chosen, cfg.group, cfg.max_new_tokens, cfg.temperature,
                                   cfg.top_k, g)
        except NonFinitePolicy as e:  # no loss to compute: the guard's verdict instead
            yield None, {"problem": str(e)}, []
            return
        rows = [(prompt, c) for prompt, completions in groups for c in completions]
        rewards = [[self.reward(ex.prompt(), text_of(self.tok, c), ex) for c in completions]
                   for ex, (_, completions) in zip(chosen, groups)]
        r = torch.tensor(rewards)  # [P, G]
        batch = batch_of(rows, self.tok.pad_id)
        mask = batch.completion
        logs = {"reward": float(r.mean()), "variance_share": variance_share(r),
                "length": float(mask.sum(-1).float().mean())}
        flat = [float(v) for v in r.flatten()]
        if not logs["variance_share"] and not (self.method == "grpo" and cfg.kl_beta):
            yield NO_SIGNAL, logs, flat  # every advantage is 0, and so is the gradient: no update to make
            return
        if self.method == "reinforce":
            logps = token_logps(self.model, batch.ids, mask)
            G = cfg.group
            loss = torch.stack([reinforce_loss(logps[i * G:(i + 1) * G], mask[i * G:(i + 1) * G], r[i])
                                for i in range(len(chosen))]).mean()
            yield loss, logs, flat
            return
        adv = group_advantages(r).flatten()  # [P * G]
        ref = None
        if cfg.kl_beta:
            with torch.no_grad(), active_off(self.model):
                ref = token_logps(self.model, batch.ids, mask)
        old = None
        for _ in range(cfg.inner_steps):
            logps = token_logps(self.model, batch.ids, mask)
            old = logps.detach() if old is None else old  # the sampling policy's: the first update is on-policy
            loss, extra = grpo_loss(logps, old, adv, mask, cfg.epsilon, cfg.kl_beta, ref, cfg.loss_type)
            yield loss, {**logs, **extra}, flat


def align_stack(model: nn.Module, tok: Tokenizer, domain: str, method: str, train: Sequence[Example],
                val: Sequence[Example], val_loss: Callable[[], float], cfg: RLConfig = RLConfig(), seed: int = 0,
                ckpt_dir: str | Path | None = None, owner: dict | None = None, progress: bool = True,
                after_step: Callable[[nn.Module], None] | None = None,
                after_update: Callable[[nn.Module, int], None] | None = None) -> dict:
    """RL (`method`: dpo, grpo or reinforce) on the active stack of `model`, left active and aligned (or, if the
    guard tripped, as it was at its last good step). Returns the result: config, curves, before and after,
    the guard's verdict. `seed` is the stack's own (sft.stack_seed); `after_update(model, step)` runs after
    every update (tests inject faults there). With `ckpt_dir` the run checkpoints every `ckpt_every` steps
    and resumes from there; the checkpoint names its run ({**owner, "method": method}) and refuses any other."""
    al = Aligner(model, tok, domain, method, train, val, val_loss, cfg, seed)
    params = active_parameters(model)
    layers = len(list(stacked_layers(model)))
    identity = {**(owner or {}), "domain": domain, "method": method}
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=0.0)
    guard = BlowUpGuard(cfg.guard)
    ckpt = load_latest(ckpt_dir) if ckpt_dir is not None else None
    if ckpt is not None and ckpt.state.get("identity") != identity:
        raise CheckpointMismatchError(f"{ckpt_dir} holds the RL checkpoint of {ckpt.state.get('identity')}, not of "
                                      f"{identity}: delete {ckpt_dir} to run this RL afresh")
    if ckpt is not None:
        restore_active(model, unflatten_snapshot("active", ckpt.model, layers))
        good = unflatten_snapshot("good", ckpt.model, layers)
        optimizer_from_tensors(opt, *ckpt.optimizer)
        result = ckpt.state["result"]
        guard = BlowUpGuard(cfg.guard, ckpt.state["guard_history"])
    else:
        good = snapshot_active(model)
        result = {"domain": domain, "method": method, "config": asdict(cfg), "steps_run": 0, "updates": 0,
                  "curve": [], "measures": [], "guard": None, "seconds": 0.0, "before": al.measure(),
                  "n_train": len(al.pairs if method == "dpo" else al.prompts)}
        result["measures"].append({"step": 0, **result["before"]})

    def checkpoint(done: bool) -> None:
        if ckpt_dir is not None:
            tensors = {**flatten_snapshot("active", snapshot_active(model)), **flatten_snapshot("good", good)}
            state = {"identity": identity, "result": result, "guard_history": guard.state(), "done": done}
            save_checkpoint(ckpt_dir, result["steps_run"], tensors, opt, state)

    done = ckpt is not None and ckpt.state["done"]
    # every forward in eval mode: no routing noise, so the sampler and the learner agree (module docstring)
    with training_state(model, False):
        steps = range(result["steps_run"], cfg.steps)
        bar = tqdm(steps, desc=f"{domain} {method}", disable=not progress or done, dynamic_ncols=True, leave=False)
        for step in [] if done else bar:
            t0 = time.perf_counter()
            losses = al.dpo_losses(step) if method == "dpo" else al.group_losses(step)
            for loss, logs, rewards in losses:
                update = loss is not None and loss is not NO_SIGNAL
                if loss is None:  # the policy could not even be sampled from
                    checked, problem = {}, logs["problem"]
                elif not update:  # nothing to learn: no optimizer step (AdamW would still move on its old moments)
                    checked = {"loss": 0.0, "grad_norm": 0.0}
                    problem = guard.problem({}, rewards)
                else:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))  # before clipping
                    checked = {"loss": float(loss.detach()), "grad_norm": norm}
                    problem = guard.problem(checked, rewards)
                if problem is not None:
                    restore_active(model, good)  # the weights of the last step whose checks passed
                    result["guard"] = {"step": step + 1, "reason": problem, "restored": "the last good stack"}
                    break
                if update:
                    good = snapshot_active(model)  # these weights gave a sound loss and gradient: the last good ones
                    guard.accept(checked)
                    opt.step()
                    if after_step is not None:
                        after_step(model)
                    result["updates"] += 1
                    if after_update is not None:
                        after_update(model, result["updates"])
                result["curve"].append({"step": step + 1, **checked, **logs, "update": update})
            result["seconds"] += time.perf_counter() - t0
            result["steps_run"] = step + 1
            stop = result["guard"] is not None
            if not stop and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                result["measures"].append({"step": step + 1, **al.measure()})
            if stop or step + 1 == cfg.steps:
                break
            if (step + 1) % cfg.ckpt_every == 0:
                checkpoint(False)
            bar.set_postfix(loss=f"{checked['loss']:.3f}")
        bar.close()
    if not done:
        # the stack the run ends with, measured: after the guard restored it, the last good stack's numbers
        result["after"] = result["measures"][-1] if result["guard"] is None else {"step": result["steps_run"],
                                                                                  **al.measure()}
        checkpoint(True)
    return result
