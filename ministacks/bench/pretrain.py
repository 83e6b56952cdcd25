"""How fast does pretraining run on this machine, and how close is that to what the machine can do?

`bench_pretrain` times full training steps (forward + backward + AdamW) of the from-scratch model on
random tokens and reports tokens/s. To judge that number it also measures, in the same process, the
best fp32 matmul throughput of this CPU (square `torch.mm`), and reports the model FLOP utilisation

    MFU = (training FLOPs per token * tokens/s) / (measured matmul FLOP/s)

against the *measured* peak rather than a datasheet figure: on a shared 2-core machine the datasheet
is fiction, and the question a reader has is "is the model's time spent in matmuls, or in overhead?".

Training FLOPs per token (Kaplan et al. 2020; PaLM appendix B), counting a multiply-add as 2 FLOPs:

    F = 6 * N_matmul + 6 * n_layer * T * d_model

    N_matmul = weights multiplied per token: every nn.Linear of the decoder layers plus the LM head
               (the embedding lookup is a gather, not a matmul; RMSNorm weights are elementwise).
    6        = 2 for the forward matmul + 4 for the backward (grad wrt input and grad wrt weight).
    6*L*T*d  = attention scores Q K^T and the weighted sum A V: 2 * 2 * T * d per token per layer
               forward, times 3 with the backward. Counted for the full T x T square although causal
               attention needs half; this is the convention of the PaLM MFU formula.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ..lm.model import ModelConfig, Transformer
from ..runtime import keep_freed_memory
from .timing import time_interleaved


def matmul_gflops(sizes: tuple[int, ...] = (1024, 1536, 2048), repeats: int = 3) -> float:
    """Best fp32 GFLOP/s of C = A @ B over a few square sizes: the ceiling a model step can reach."""
    g = torch.Generator().manual_seed(0)
    mats = {f"{n}": (torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)) for n in sizes}
    # one untimed warm-up call each: the first pays for thread-pool start-up and page faults
    t = time_interleaved({k: (lambda a=a, b=b: torch.mm(a, b)) for k, (a, b) in mats.items()},
                         rounds=repeats, warmup=1)
    return max(2 * n**3 / t.fastest[f"{n}"] / 1e9 for n in sizes)


def training_flops_per_token(model: Transformer, seq_len: int) -> int:
    """F = 6 * N_matmul + 6 * n_layer * seq_len * d_model (see the module docstring)."""
    cfg = model.cfg
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return 6 * n_matmul + 6 * cfg.n_layer * seq_len * cfg.d_model


def bench_pretrain(cfg: ModelConfig | None = None, batch_size: int = 16, seq_len: int = 256,
                   steps: int = 10, warmup: int = 3, seed: int = 0, time_budget_s: float = 40.0) -> dict:
    """Time `steps` training steps after `warmup` untimed ones; return a dict of measurements.

    It calls `keep_freed_memory()` first (a process-wide allocator setting; see there).
    tokens_per_second uses the median step time: the machine may be shared, and the median ignores
    the occasional step that lost its cores to another process (the best step is reported too).
    On a busy machine, timing stops after `time_budget_s` seconds of steps (keeping at least 3
    timed steps) so the whole benchmark stays under a minute; `steps` in the result is what ran.
    """
    keep_freed_memory()
    cfg = cfg or ModelConfig()
    if seq_len > cfg.max_seq_len:
        cfg = dataclasses.replace(cfg, max_seq_len=seq_len)
    torch.manual_seed(seed)
    model = Transformer(cfg).train()
    # fused AdamW: one kernel over all parameters. On this model the optimizer is <1% of a step,
    # so fused vs foreach vs the for-loop differ by less than the run-to-run noise; fused is simplest.
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=g)

    # the machine's ceiling is probed before and after the steps, keeping the best: a probe that
    # coincides with another process's burst would otherwise report MFU above 100%
    peak = matmul_gflops()

    def step() -> torch.Tensor:
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()  # kept for final_loss; detached, so no step's graph outlives it

    t = time_interleaved({"step": step}, rounds=steps, warmup=warmup, budget_s=time_budget_s, keep=("step",))
    median, tokens = t.median["step"], batch_size * seq_len

    peak = max(peak, matmul_gflops())
    flops_tok = training_flops_per_token(model, seq_len)
    tps = tokens / median
    achieved = flops_tok * tps / 1e9
    return dict(
        tokens_per_second=tps,
        best_tokens_per_second=tokens / t.fastest["step"],
        step_seconds=median,
        matmul_gflops=peak,
        model_gflops_per_second=achieved,
        mfu=achieved / peak,
        flops_per_token=flops_tok,
        params=model.num_params(),
        threads=torch.get_num_threads(),
        batch_size=batch_size,
        seq_len=seq_len,
        steps=t.rounds,
        final_loss=t.results["step"][-1].item(),
        config=cfg.to_dict(),
    )


def format_bench_pretrain(d: dict) -> str:
    c = d["config"]
    return "\n".join([
        "pretrain benchmark (fp32, forward + backward + AdamW, random tokens)",
        f"  model       {d['params'] / 1e6:.2f}M params: {c['n_layer']} layers, d_model {c['d_model']}, "
        f"{c['n_head']} heads / {c['n_kv_head']} kv heads, vocab {c['vocab_size']}",
        f"  batch       {d['batch_size']} x {d['seq_len']} tokens, {d['steps']} timed steps, "
        f"{d['threads']} threads",
        f"  speed       {d['tokens_per_second']:,.0f} tokens/s (median step {d['step_seconds'] * 1e3:.0f} ms; "
        f"best {d['best_tokens_per_second']:,.0f} tokens/s)",
        f"  compute     {d['flops_per_token'] / 1e6:.1f} MFLOP/token -> {d['model_gflops_per_second']:.1f} GFLOP/s",
        f"  machine     {d['matmul_gflops']:.1f} GFLOP/s best fp32 matmul",
        f"  MFU         {100 * d['mfu']:.1f}% of measured matmul throughput"
        + ("  (over 100%: the machine was busy while matmul was measured; rerun)" if d["mfu"] > 1 else ""),
    ])




if __name__ == "__main__":
    print(format_bench_pretrain(bench_pretrain()))
