"""Is MoE-LoRA as fast to train as the single LoRA it is parameter-matched with?

The paper (Exp. 1) trained MoE-LoRA (4 experts x rank 16) 2.1x slower per step than a single rank-64
LoRA (20.2 vs 9.5 min), although the two do the same matmul FLOPs: every expert's A_i x for every token
is a [T, d_in] @ [d_in, 4*16] product either way. What differs is *how* the experts are combined (the
paper timed GPUs; this benchmark shows the same effect on a CPU):

    naive (the released code)                        fast (ministacks.adapters.moe_lora)
    h   = einsum('tf,erf->ter', x, A)  [T, E, R]     h = x @ [A_1; ..; A_E]^T            [T, E*R]
    all = einsum('ter,eor->teo', h, B) [T, E, O] !   h = h * (s * gates, repeated R times)
    Δ   = sum_e gates[:, e] * all[:, e]  [T, O]      Δ = h @ [B_1 | .. | B_E]^T           [T, O]

Same FLOPs. The naive form materialises every expert's full d_out-wide output, a tensor E times the
size of the layer's output that is written, read back, multiplied and summed (and kept for the
backward pass), and its second einsum is a batch of E thin [T, R] @ [R, O] products with permuted
copies around them; the fast form is exactly a rank-64 LoRA plus an elementwise multiply of the
[T, 64] intermediate.

`bench_moe` times one training step of the same frozen model on the same batch, four ways:
  base   the frozen model alone. It has nothing to train, so the step is forward + backward with the
         embedding output marked as requiring grad: the backward pass through every frozen layer that
         each adapter variant must also pay (input gradients, no weight gradients), and no optimizer.
  lora   + a rank-64 LoRA on all 7 projections of every layer      (forward + backward + AdamW)
  moe    + MoE-LoRA, 4 experts x rank 16, noisy top-2, loss + 0.01 * sum of aux losses
  naive  + the same MoE-LoRA (same routing, same aux loss) combining experts the released code's way
The variants run interleaved (base, lora, moe, naive, base, ...) so that another process taking the
cores slows all of them alike, and the medians are reported with the ratios moe/lora, naive/lora and
lora/base.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from ..adapters.lora import AdapterOutput, LoRA
from ..adapters.moe_lora import MoELoRA, load_balance_loss, route
from ..lm.model import ModelConfig, Transformer
from ..runtime import keep_freed_memory
from ..stacks.layer import add_stack, aux_loss, inject_stacks
from .timing import busy_machine, time_interleaved

AUX_LOSS_WEIGHT = 0.01  # λ of the paper's total loss, task + λ · Σ L_aux (docs/brainstacks.md §1)
VARIANTS = ("base", "lora", "moe", "naive")


class NaiveMoELoRA(MoELoRA):
    """The released code's form of MoE-LoRA, kept for the benchmark and as a second parity reference.

    Routing and the aux loss are those of `MoELoRA` (so only the expert combination differs); the
    experts are evaluated all at once with two einsums and a [T, E, d_out] intermediate."""

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> AdapterOutput:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.d_in)  # [T, F]
        logits = self.noisy_logits(self.router(x), self.noise(x), noise)
        gates, dispatch, probs = route(logits, self.routing, self.top_k, self.top_p)
        aux = load_balance_loss(probs, dispatch, detach=self.detach_aux)
        # T tokens, F d_in, E experts, R rank, O d_out
        h = torch.einsum("tf,erf->ter", x, self.lora_A)  # [T, F] x [E, R, F] -> [T, E, R]
        every = torch.einsum("ter,eor->teo", h, self.lora_B) * self.scaling  # -> [T, E, O], all experts
        delta = (gates.unsqueeze(-1) * every).sum(dim=1)  # [T, E, 1] * [T, E, O] -> [T, O]
        return AdapterOutput(delta.view(*lead, self.d_out), aux)


def _variant(kind: str, base: Transformer, n_experts: int, r: int, top_k: int):
    """(model, optimizer or None) for one variant, on a copy of the same frozen base."""
    model = copy.deepcopy(base)
    make = {
        "base": None,
        "lora": lambda i, o: LoRA(i, o, r=n_experts * r),
        "moe": lambda i, o: MoELoRA(i, o, n_experts=n_experts, r=r, top_k=top_k),
        "naive": lambda i, o: NaiveMoELoRA(i, o, n_experts=n_experts, r=r, top_k=top_k),
    }[kind]
    if make is None:
        # nothing trainable: let the backward pass start from the embeddings instead
        model.embed_tokens.register_forward_hook(lambda mod, inp, out: out.requires_grad_())
        return model.train(), None
    inject_stacks(model)  # the real stacked layer, as in training
    params = add_stack(model, make)
    model.train(True)
    # fused AdamW over the adapter parameters only (the base is frozen), as in training
    return model, torch.optim.AdamW(params, lr=2e-4, fused=True)


def _step(model: Transformer, opt, x: torch.Tensor) -> None:
    """One training step (no optimizer for the frozen base)."""
    loss = model(x, labels=x).loss + AUX_LOSS_WEIGHT * aux_loss(model)
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def bench_moe(cfg: ModelConfig | None = None, batch_size: int = 16, seq_len: int = 256, steps: int = 8,
              warmup: int = 1, seed: int = 0, n_experts: int = 4, r: int = 16, top_k: int = 2,
              time_budget_s: float = 60.0) -> dict:
    """Median seconds per training step of base / lora / moe / naive on one frozen model and batch.

    Up to `steps` interleaved rounds are timed after `warmup` untimed ones (the first step of each
    variant allocates AdamW's state). Once `time_budget_s` seconds have passed, counting the warm-up,
    timing stops, keeping at least 3 rounds: a few seconds per round on 2 idle cores, so about a
    minute in all, longer on a busy machine. Returns a dict with `seconds` per variant, the ratios
    `moe/lora`, `naive/lora`, `lora/base`, the trainable parameter counts, and the settings."""
    keep_freed_memory()
    cfg = cfg or ModelConfig()
    if seq_len > cfg.max_seq_len:
        cfg = dataclasses.replace(cfg, max_seq_len=seq_len)
    torch.manual_seed(seed)
    base = Transformer(cfg).requires_grad_(False)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    variants = {k: _variant(k, base, n_experts, r, top_k) for k in VARIANTS}
    trainable = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, (m, _) in variants.items()}

    # interleaved: base, lora, moe, naive, base, ...
    timed = time_interleaved({k: (lambda k=k: _step(*variants[k], x)) for k in VARIANTS}, rounds=steps,
                             warmup=warmup, budget_s=time_budget_s)
    med, best = timed.median, timed.fastest

    def ratios(t: dict) -> dict:
        return {"moe/lora": t["moe"] / t["lora"], "naive/lora": t["naive"] / t["lora"], "lora/base": t["lora"] / t["base"]}

    return dict(
        seconds=med,
        ratios=ratios(med),
        # the same ratios from each variant's fastest step: on an idle machine they agree with the medians;
        # when other processes compete for the cores the medians drift and the two disagree
        best_seconds=best,
        best_ratios=ratios(best),
        # median / best step of each variant, the noise of the measurement (1.0 = perfectly steady)
        spread=timed.spread,
        trainable_params=trainable,
        rounds=timed.rounds,
        batch_size=batch_size, seq_len=seq_len, n_experts=n_experts, r=r, top_k=top_k,
        threads=torch.get_num_threads(), config=cfg.to_dict(),
    )


def format_bench_moe(d: dict) -> str:
    c, s, q = d["config"], d["seconds"], d["ratios"]
    tok = d["batch_size"] * d["seq_len"]
    lines = [
        "MoE-LoRA vs parameter-matched LoRA: one training step (fp32, frozen base, forward + backward + AdamW)",
        f"  model     {c['n_layer']} layers, d_model {c['d_model']}, vocab {c['vocab_size']}; "
        f"adapters on all 7 projections",
        f"  batch     {d['batch_size']} x {d['seq_len']} tokens, {d['rounds']} interleaved rounds, "
        f"{d['threads']} threads, medians",
    ]
    names = {"base": "frozen base (fwd + bwd to the embeddings)",
             "lora": f"+ LoRA r={d['n_experts'] * d['r']}",
             "moe": f"+ MoE-LoRA {d['n_experts']}x r{d['r']} top-{d['top_k']} (fast)",
             "naive": f"+ MoE-LoRA {d['n_experts']}x r{d['r']} top-{d['top_k']} (released-code einsums)"}
    for k in VARIANTS:
        lines.append(f"  {names[k]:<58} {s[k] * 1e3:7.0f} ms/step  {tok / s[k]:8,.0f} tok/s  "
                     f"{d['trainable_params'][k] / 1e6:5.2f}M trainable")
    b = d["best_ratios"]
    lines += [
        f"  ratios    moe/lora {q['moe/lora']:.2f}   naive/lora {q['naive/lora']:.2f}   lora/base {q['lora/base']:.2f}"
        f"   (paper, released code: moe/lora 2.1)",
        f"  (best)    moe/lora {b['moe/lora']:.2f}   naive/lora {b['naive/lora']:.2f}   lora/base {b['lora/base']:.2f}"
        f"   from each variant's fastest step",
    ]
    worst = busy_machine(d["spread"].values()).spread
    if worst:
        lines.append(f"  warning   median steps up to {worst:.2f}x the fastest: the cores were busy with other "
                     f"work, so these ratios are unreliable; rerun on an idle machine")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_bench_moe(bench_moe()))
