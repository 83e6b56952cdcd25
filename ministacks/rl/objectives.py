"""The RL objectives for a domain's last stack after SFT (docs/brainstacks.md §8): DPO, GRPO and REINFORCE.

The paper aligns a domain's last stack with RL before it is frozen and publishes neither code nor
hyperparameters; these are the standard forms (TRL's, as ../shared/spec/scale-notes.md records them),
written out so each line is one term of the equation.

The policy is the model with its active stack; the reference is the same model with the active stack
switched off (`active_off`): the base plus every frozen stack, what the active stack started from. No
model is copied. (Switching every adapter off instead, peft's `disable_adapter`, would also drop the
frozen stacks: a reference the policy never was.)

    sequence_logps      log π(y | x) = Σ_t log π(y_t | x, y_<t), summed over the completion's tokens

DPO (Rafailov et al. 2023), one (prompt, chosen, rejected) pair at a time:

    r_c = β (log π(y_c|x) − log π_ref(y_c|x))          the chosen's implicit reward
    r_r = β (log π(y_r|x) − log π_ref(y_r|x))          the rejected's
    loss = −log σ(r_c − r_r)                            per pair; the batch's loss is the mean

GRPO (Shao et al. 2024), G sampled completions per prompt, rewards r_1..r_G:

    A_i = (r_i − mean(r)) / (std(r) + 1e-4)             std with Bessel's correction, per group
    ρ_i,t = exp(log π(y_i,t) − log π_old(y_i,t))        the ratio to the policy that sampled
    ℓ_i,t = −min(ρ A_i, clip(ρ, 1 − ε, 1 + ε) A_i) + β KL_i,t,    KL_i,t = e^(ref − logp) − (ref − logp) − 1

    and the token average (`loss_type`):
      "grpo"     mean over sequences of each sequence's token mean: a long completion's tokens weigh
                 less each, so for a negative advantage length is rewarded (the length bias)
      "bnpo"     Σ ℓ over every completion token / their number: each token weighs the same (default)
      "dr_grpo"  Σ ℓ / (G × max_len): a constant divisor, no length in the weights at all

REINFORCE with a group-mean baseline is what GRPO reduces to on-policy (ρ = 1, so the clip never binds)
without the KL and without dividing by the std; its loss is three lines:

    advantage = rewards - rewards.mean()            # per group: the baseline is the group's mean
    logp = (token_logps * mask).sum(-1)             # log π(y_i | x)
    loss = -(advantage * logp).mean()               # ∇ = −E[A ∇log π]: the policy gradient

(nanochat's chat_rl.py explains its "GRPO" the same way.) With one on-policy step, ε → ∞ and no KL,
GRPO's gradient is this one with A divided by std + 1e-4 and the token average in place of the sum
(tests/test_rl.py checks it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..stacks.layer import stacked_layers
from ..training.examples import logits_at

ADV_EPS = 1e-4  # TRL's: keeps a group with (nearly) equal rewards from dividing by zero
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


# -- the reference and the log-probs -------------------------------------------------------------------

@contextmanager
def active_off(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every layer runs without its active stack: the base plus the frozen stacks, the
    reference of DPO and GRPO. The active stacks are back afterwards, even if the block raised."""
    layers = list(stacked_layers(model))
    saved = [layer.active for layer in layers]
    for layer in layers:
        layer.active = None
    try:
        yield model
    finally:
        for layer, active in zip(layers, saved):
            layer.active = active


def token_logps(model: nn.Module, ids: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """log π(ids[:, t] | ids[:, <t]) at every completion position, 0 elsewhere: [B, T].

    ids [B, T] are prompt + completion (+ padding); completion [B, T] is True at the completion's tokens.
    The first token is never a completion token (it has nothing before it to be predicted from)."""
    target = ids[:, 1:]  # [B, T-1]: position t predicts token t+1
    scored = completion[:, 1:]
    at = F.pad(scored, (0, 1), value=False)  # [B, T]: the positions whose next token is a completion token
    logits = logits_at(model, ids, at).float()  # [N, V]
    picked = F.log_softmax(logits, -1).gather(1, target[scored][:, None])[:, 0]  # [N]
    out = torch.zeros(ids.shape, dtype=picked.dtype, device=ids.device)
    out[:, 1:][scored] = picked
    return out


def sequence_logps(model: nn.Module, ids: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """log π(completion | prompt) per row, summed over the completion's tokens: [B]."""
    return token_logps(model, ids, completion).sum(-1)


# -- DPO -------------------------------------------------------------------------------------------------

class DPOLoss(NamedTuple):
    losses: torch.Tensor  # [P] per pair
    chosen_rewards: torch.Tensor  # [P] β (log π − log π_ref) of the chosen, detached
    rejected_rewards: torch.Tensor  # [P] the same for the rejected


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1) -> DPOLoss:
    """The sigmoid DPO loss per pair (module docstring), from sequence log-probs [P] (summed over the
    completion's tokens). The rewards are logged quantities, detached: their accuracy (chosen > rejected)
    and margin say how far the policy has moved from the reference on the pairs."""
    chosen = policy_chosen_logps - ref_chosen_logps  # log π/π_ref of the chosen
    rejected = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return DPOLoss(losses, (beta * chosen).detach(), (beta * rejected).detach())


def dpo_metrics(out: DPOLoss) -> dict[str, float]:
    """What a DPO step logs: the loss, chosen and rejected rewards, their margin and the reward accuracy."""
    margin = out.chosen_rewards - out.rejected_rewards
    return {"loss": float(out.losses.detach().mean()), "chosen_reward": float(out.chosen_rewards.mean()),
            "rejected_reward": float(out.rejected_rewards.mean()), "margin": float(margin.mean()),
            "reward_accuracy": float((margin > 0).float().mean())}


# -- GRPO and REINFORCE -------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [P, G] (G completions of each of P prompts) -> A [P, G] = (r − mean) / (std + 1e-4) per group.
    A group whose rewards are all equal gets A = 0: it teaches nothing (`variance_share` counts them)."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True) if rewards.shape[-1] > 1 else torch.zeros_like(mean)  # Bessel-corrected
    return (rewards - mean) / (std + ADV_EPS)


def variance_share(rewards: torch.Tensor) -> float:
    """The share of groups (rows of rewards [P, G]) whose rewards are not all equal: those GRPO learns from."""
    return float((rewards.max(-1).values > rewards.min(-1).values).float().mean())


def average_tokens(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str = "bnpo") -> torch.Tensor:
    """The scalar loss from a per-token loss [B, T] over the completion tokens `mask` [B, T] (module docstring)."""
    mask = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (mask.shape[0] * mask.shape[1])
    raise ValueError(f"unknown loss_type {loss_type!r}: use one of {', '.join(LOSS_TYPES)}")


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              epsilon: float = 0.2, beta: float = 0.0, ref_logps: torch.Tensor | None = None,
              loss_type: str = "bnpo") -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's clipped surrogate (module docstring). logps, old_logps, ref_logps: per-token log-probs [B, T]
    (token_logps) of the policy, of the policy that sampled (detached), of the reference; advantages [B],
    one per completion (group_advantages, flattened); mask [B, T] the completion tokens. Returns the loss
    and what to log: the share of tokens where the clip binds, and the mean KL when it is computed."""
    ratio = torch.exp(logps - old_logps.detach())  # [B, T]
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv
    per_token = -torch.min(unclipped, clipped)
    m = mask.to(per_token.dtype)
    logs = {"clip_share": float(((clipped < unclipped).to(m.dtype) * m).sum() / m.sum().clamp(min=1))}
    if beta:
        if ref_logps is None:
            raise ValueError("a KL term (beta > 0) needs the reference's log-probs (ref_logps)")
        diff = ref_logps.detach() - logps
        kl = torch.exp(diff) - diff - 1  # k3 (Schulman): ≥ 0, unbiased for KL(π ‖ π_ref)
        per_token = per_token + beta * kl
        logs["kl"] = float((kl.detach() * m).sum() / m.sum().clamp(min=1))
    return average_tokens(per_token, mask, loss_type), logs


def reinforce_loss(token_logps: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE with a group-mean baseline, for one group: token_logps [G, T], mask [G, T], rewards [G]."""
    advantage = rewards - rewards.mean()  # per group: the baseline is the group's mean
    logp = (token_logps * mask).sum(-1)  # log π(y_i | x)
    return -(advantage * logp).mean()  # ∇ = −E[A ∇log π]: the policy gradient
