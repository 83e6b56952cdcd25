"""The RL objectives (rl/objectives.py): each against a direct transcription of its formula or a hand
computation; the reference is base + frozen stacks; GRPO on-policy without clip or KL is REINFORCE."""

import math

import pytest
import torch

from ministacks.lm.model import ModelConfig, Transformer
from ministacks.stacks.layer import AdapterConfig, add_stack, freeze_active, inject_stacks, make_adapter, stacked_layers
from ministacks.rl.objectives import (active_off, average_tokens, dpo_loss, dpo_metrics, group_advantages, grpo_loss,
                                      reinforce_loss, sequence_logps, token_logps, variance_share)


def test_dpo_loss_is_the_formula_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g) * 5 for _ in range(4))
    pc.requires_grad_(True)
    beta = 0.1
    out = dpo_loss(pc, pr, rc, rr, beta)
    z = beta * ((pc - rc) - (pr - rr))
    transcribed = [-math.log(1 / (1 + math.exp(-zi))) for zi in z.tolist()]
    assert out.losses.tolist() == pytest.approx(transcribed, rel=1e-5)
    assert out.chosen_rewards.tolist() == pytest.approx((beta * (pc - rc)).tolist(), rel=1e-6)
    assert out.rejected_rewards.tolist() == pytest.approx((beta * (pr - rr)).tolist(), rel=1e-6)
    out.losses.sum().backward()
    # d/dπ_c of −log σ(z) = −β (1 − σ(z))
    assert pc.grad.tolist() == pytest.approx((-beta * (1 - torch.sigmoid(z.detach()))).tolist(), rel=1e-5)
    m = dpo_metrics(out)
    assert m["reward_accuracy"] == pytest.approx(float((z > 0).float().mean()))
    assert m["margin"] == pytest.approx(float(z.detach().mean()), rel=1e-5)


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    a = group_advantages(rewards)
    std0 = math.sqrt((4 * 0.25) / 3)  # Bessel: Σ (r − 0.5)² / (G − 1)
    a0 = 0.5 / (std0 + 1e-4)
    assert a[0].tolist() == pytest.approx([a0, -a0, -a0, a0], rel=1e-6)
    assert a[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # equal rewards: nothing to learn
    std2 = math.sqrt((3 * 0.75**2 + 2.25**2) / 3)
    assert a[2].tolist() == pytest.approx([-0.75 / (std2 + 1e-4)] * 3 + [2.25 / (std2 + 1e-4)], rel=1e-6)
    assert variance_share(rewards) == pytest.approx(2 / 3)


def test_the_clip_binds_only_where_the_ratio_left_the_trust_region_in_the_advantages_direction():
    old = torch.zeros(2, 3)
    logps = torch.full((2, 3), math.log(1.5)).requires_grad_(True)  # ratio 1.5, past 1 + ε = 1.2
    mask = torch.ones(2, 3, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    loss, logs = grpo_loss(logps, old, adv, mask, epsilon=0.2, loss_type="grpo")
    # row 0 (A > 0): min(1.5, 1.2) = 1.2, clipped, no gradient; row 1 (A < 0): min(−1.5, −1.2) = −1.5, not
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    assert logs["clip_share"] == pytest.approx(0.5)
    loss.backward()
    assert logps.grad[0].tolist() == [0.0, 0.0, 0.0]
    assert logps.grad[1].tolist() == pytest.approx([1.5 / 3 / 2] * 3)  # ∂(−Aρ)/∂logp = ρ, over T tokens and B rows


def test_token_averages():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    assert average_tokens(per_token, mask, "grpo").item() == pytest.approx((2.5 + 5.5) / 2)
    assert average_tokens(per_token, mask, "bnpo").item() == pytest.approx(21 / 6)
    assert average_tokens(per_token, mask, "dr_grpo").item() == pytest.approx(21 / 8)
    with pytest.raises(ValueError, match="loss_type"):
        average_tokens(per_token, mask, "mean")


def test_the_kl_term_is_k3_and_needs_the_reference():
    logps = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    base, _ = grpo_loss(logps, logps, torch.tensor([0.0]), mask)
    with_kl, logs = grpo_loss(logps, logps, torch.tensor([0.0]), mask, beta=0.5, ref_logps=ref)
    k3 = [math.exp(r - p) - (r - p) - 1 for r, p in zip(ref[0].tolist(), logps[0].tolist())]
    assert with_kl.item() - base.item() == pytest.approx(0.5 * sum(k3) / 2)
    assert logs["kl"] == pytest.approx(sum(k3) / 2)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, logps, torch.tensor([0.0]), mask, beta=0.5)


def test_grpo_on_policy_without_clip_or_kl_is_reinforce_scaled():
    """One on-policy step (old = the policy, detached), ε → ∞, no KL: GRPO's gradient is REINFORCE's with the
    advantages divided by std + 1e-4 and, under dr_grpo, the sum over tokens divided by T."""
    G, T, V = 5, 7, 11
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(G, T, V, generator=gen, requires_grad=True)
    ids = torch.randint(0, V, (G, T), generator=gen)
    mask = torch.rand(G, T, generator=gen) > 0.3
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])

    def logps():
        return torch.log_softmax(theta, -1).gather(2, ids[..., None])[..., 0] * mask

    loss, _ = grpo_loss(logps(), logps().detach(), group_advantages(rewards[None])[0], mask, epsilon=1e9,
                        loss_type="dr_grpo")
    (g_grpo,) = torch.autograd.grad(loss, theta)
    (g_reinforce,) = torch.autograd.grad(reinforce_loss(logps(), mask, rewards), theta)
    # GRPO: −Σ A_i ∇log π_i,t / (G·T) with A = (r − mean) / (std + 1e-4); REINFORCE: −Σ (r − mean) ∇log π_i,t / G
    assert g_reinforce.abs().max() > 1e-3  # a real gradient, not two zeros
    assert torch.allclose(g_grpo * T * (rewards.std() + 1e-4), g_reinforce, atol=1e-6)


CFG = ModelConfig(vocab_size=50, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=16)


def _stacked():
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    inject_stacks(model)
    for _ in range(2):  # a frozen stack, then the active one; both with a nonzero B
        add_stack(model, make_adapter("moe", AdapterConfig(n_experts=2, r=4, top_k=1)))
        with torch.no_grad():
            for layer in stacked_layers(model):
                layer.active.lora_B.normal_(std=0.1)
        if _ == 0:
            freeze_active(model, "chat")
    return model.eval()  # the active stack too: no routing noise, so two forwards agree


def test_the_reference_is_the_base_plus_the_frozen_stacks():
    model = _stacked()
    ids = torch.randint(0, CFG.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    completion = torch.zeros_like(ids, dtype=torch.bool)
    completion[:, 6:] = True
    with torch.no_grad():
        policy = sequence_logps(model, ids, completion)
        with active_off(model):
            ref = sequence_logps(model, ids, completion)
        assert not torch.allclose(policy, ref)  # the active stack matters to the policy
        for layer in stacked_layers(model):  # changing the active stack leaves the reference alone
            layer.active.lora_B.mul_(3.0)
        with active_off(model):
            assert torch.equal(sequence_logps(model, ids, completion), ref)
        for layer in stacked_layers(model):  # changing a frozen stack moves it
            layer.stacks["chat"][0].lora_B.mul_(3.0)
            layer.invalidate()
        with active_off(model):
            assert not torch.allclose(sequence_logps(model, ids, completion), ref)
    assert all(layer.active is not None for layer in stacked_layers(model))  # back after the block


def test_token_logps_score_only_the_completion_and_match_the_full_softmax():
    model = _stacked()
    ids = torch.randint(0, CFG.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2))
    completion = torch.tensor([[False] * 5 + [True] * 3])
    with torch.no_grad():
        got = token_logps(model, ids, completion)
        full = torch.log_softmax(model(ids).logits, -1)
    assert got[0, :5].tolist() == [0.0] * 5
    for t in range(5, 8):
        assert got[0, t].item() == pytest.approx(full[0, t - 1, ids[0, t]].item(), abs=1e-5)
