"""What does the null-space projection cost, and is the randomized SVD accurate enough? (docs/brainstacks.md §5)

(a) Step-time overhead during stack training. One frozen model (the quick preset's base, ModelConfig()
    defaults: 4 layers, d 256, vocab 4096) with one frozen MoE-LoRA stack and an active one, batch
    16 × 256, K = 32 protected directions per projection. The same training step (forward, loss + aux,
    backward, grad clip, AdamW — as in `train_round`) is timed three ways, interleaved so that other
    processes on the cores slow all three alike:
        none     no projection
        forward  the active stack kept out of V in every wrapped projection (the released code's mode)
        strict   forward, plus B ← B − V(VᵀB) for every expert after the optimizer step (our default)
    How the forward projection is computed matters. Projecting every token's delta, δ − (δV)Vᵀ, costs
    2·K·d_out multiply-adds per token and wrapped projection, and as much again in backward: on this
    model ~9% of a step (measured +10.5%), because K/d = 32/256 is large. But δ is linear in each expert's
    B, so δ(I − VVᵀ) = s Σ g_i (B_i − V VᵀB_i) A_i x: projecting the E·r columns of B once per forward
    (d_out·K·E·r work, independent of the number of tokens) gives the same delta and the same gradients.
    That is what StackedLinear does (the adapters' `out_basis`). Strict's B ← B − V(VᵀB) after the step
    is once per step as well.
    The directions are random orthonormal V: the cost does not depend on which directions they are.

(b) Randomized vs full SVD at Gemma's size: D [400, 3840] (n = 400 examples, d_out = 3840), k = 64,
    with a geometric spectrum s_i = 0.97^i (a trained stack's delta spectrum falls off fast; a rank-64
    MoE-LoRA stack alone has exactly rank ≤ 64). Accuracy of the randomized top-k against the exact one:
    the cosines of the principal angles between the two k-dimensional subspaces (1 = identical), and the
    rank-k reconstruction error ‖D − D V Vᵀ‖ relative to the optimal (full-SVD) one (1 = optimal).
    torch.svd_lowrank, the same algorithm in torch, is timed beside ours.
"""

from __future__ import annotations

import torch

from ..lm.model import ModelConfig, Transformer
from ..runtime import keep_freed_memory
from ..stacks.layer import StackedLinear, add_stack, freeze_active, inject_stacks, make_adapter
from ..training.nullspace import randomized_svd
from ..training.projection import attach_projection, detach_projection, strict_project_
from ..training.sft import StackTrainConfig, stack_step
from .timing import busy_machine, median, time_interleaved

VARIANTS = ("none", "forward", "strict")


def bench_step_overhead(batch_size: int = 16, seq_len: int = 256, k: int = 32, steps: int = 8,
                        time_budget_s: float = 55.0, seed: int = 0) -> dict:
    """Median seconds per stack-training step with no / forward / forward + strict projection."""
    torch.manual_seed(seed)
    cfg = ModelConfig()
    model = Transformer(cfg)
    inject_stacks(model)
    add_stack(model, make_adapter("moe"))
    with torch.no_grad():  # an earlier domain's stack, trained (random B stands in for it)
        for m in model.modules():
            if isinstance(m, StackedLinear):
                m.active.lora_B.normal_(0, 0.01)
    freeze_active(model, "earlier")
    params = add_stack(model, make_adapter("moe"))
    tcfg = StackTrainConfig()
    opt = torch.optim.AdamW(params, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), weight_decay=tcfg.weight_decay)
    basis = {name: torch.linalg.qr(torch.randn(m.out_features, k)).Q for name, m in model.named_modules()
             if isinstance(m, StackedLinear)}
    model.train(True)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    strict = lambda m: strict_project_(m, basis)

    # one step of `train_round`'s loop (without its bookkeeping) per variant. Round 0 is warm-up (AdamW
    # allocates its state), and the rounds are rotated so that no variant always runs first
    step = {v: (lambda after=(strict if v == "strict" else None): stack_step(model, params, opt, x, x, tcfg, after))
            for v in VARIANTS}
    attach = lambda: attach_projection(model, basis)
    # switching the projection on or off is done before each step, outside its timing
    switch = {"none": lambda: detach_projection(model), "forward": attach, "strict": attach}
    timed = time_interleaved(step, rounds=steps, warmup=1, budget_s=time_budget_s, rotate=True, prepare=switch)
    detach_projection(model)
    times = timed.seconds
    # the overhead as the median of each round's own ratio: a round's three steps run seconds apart, so
    # a busy spell of another process mostly hits all three, and the ratio survives it
    overhead = {v: median([a / b - 1 for a, b in zip(times[v], times["none"])]) for v in ("forward", "strict")}
    med, best = timed.median, timed.fastest
    return dict(seconds=med, overhead=overhead, best_seconds=best,
                best_overhead={v: best[v] / best["none"] - 1 for v in ("forward", "strict")},
                spread=timed.spread, rounds=timed.rounds,
                batch_size=batch_size, seq_len=seq_len, k=k, config=cfg.to_dict())


def bench_svd(n: int = 400, d: int = 3840, k: int = 64, decay: float = 0.97, reps: int = 5, seed: int = 0) -> dict:
    """Seconds (median of interleaved reps) and accuracy of randomized vs full SVD on a known spectrum."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, n, generator=g)).Q  # [n, n]
    W = torch.linalg.qr(torch.randn(d, n, generator=g)).Q  # [d, n]
    D = (U * decay ** torch.arange(n).float()) @ W.T  # U diag(s) Wᵀ, [n, d]
    methods = {
        "full": lambda: torch.linalg.svd(D, full_matrices=False)[2][:k].T,
        "randomized": lambda: randomized_svd(D, k, generator=torch.Generator().manual_seed(seed))[2],
        "svd_lowrank": lambda: torch.svd_lowrank(D, q=k + 8, niter=2)[2][:, :k],
    }
    timed = time_interleaved(methods, rounds=reps, keep=methods)
    V = {m: timed.results[m][-1] for m in methods}
    err = lambda V: float((D - D @ V @ V.T).norm())
    acc = {}
    for m in ("randomized", "svd_lowrank"):
        cos = torch.linalg.svdvals(V[m].T @ V["full"])  # cosines of the principal angles
        acc[m] = dict(min_cos=float(cos.min()), mean_cos2=float((cos ** 2).mean()),
                      max_angle_deg=float(torch.rad2deg(torch.arccos(cos.min().clamp(max=1)))),
                      error_ratio=err(V[m]) / err(V["full"]))
    return dict(seconds=timed.median, accuracy=acc,
                n=n, d=d, k=k, decay=decay, reps=reps)


def bench_nullspace(time_budget_s: float = 55.0) -> dict:
    """Both measurements; about a minute on 2 idle cores (much longer when other processes hold the cores)."""
    keep_freed_memory()
    return dict(step=bench_step_overhead(time_budget_s=time_budget_s), svd=bench_svd(),
                threads=torch.get_num_threads())


def format_bench_nullspace(d: dict) -> str:
    s, c = d["step"], d["step"]["config"]
    tok = s["batch_size"] * s["seq_len"]
    lines = [
        "Null-space projection: cost per stack-training step (fp32, forward + backward + AdamW)",
        (f"  model     {c['n_layer']} layers, d_model {c['d_model']}, vocab {c['vocab_size']}; one frozen + one "
         f"active MoE-LoRA stack; K = {s['k']} directions per projection"),
        (f"  batch     {s['batch_size']} x {s['seq_len']} tokens, {s['rounds']} interleaved rounds, "
         f"{d['threads']} threads, medians"),
    ]
    names = {"none": "no projection", "forward": "forward projection (reference mode)",
             "strict": "forward + B projection after each step (strict)"}
    for v in VARIANTS:
        extra = "" if v == "none" else (f"  {s['overhead'][v]:+6.1%} (best-of: {s['best_overhead'][v]:+.1%})")
        sec = s["seconds"][v]
        lines.append(f"  {names[v]:<50} {sec * 1e3:7.0f} ms/step  {tok / sec:8,.0f} tok/s{extra}")
    if busy_machine(s["spread"].values()).spread:
        lines.append("  warning   median steps well above the fastest: the cores were busy; rerun on an idle machine")
    v = d["svd"]
    lines.append(f"Top-{v['k']} SVD of a [{v['n']}, {v['d']}] delta matrix (Gemma 3 12B's d_out; "
                 f"spectrum {v['decay']}^i), median of {v['reps']}:")
    for m, t in v["seconds"].items():
        a = v["accuracy"].get(m)
        acc = "exact" if a is None else (f"min cos {a['min_cos']:.6f} (max angle {a['max_angle_deg']:.2f}°), "
                                         f"mean cos² {a['mean_cos2']:.6f}, error / optimal {a['error_ratio']:.6f}")
        speed = "" if m == "full" else f"  ({v['seconds']['full'] / t:4.1f}x faster)"
        lines.append(f"  {m:<12} {t * 1e3:8.1f} ms{speed:<18}  {acc}")
    lines.append(f"  (the k-th and (k+1)-th singular values differ by {1 / v['decay'] - 1:.0%}, so the last "
                 f"directions are nearly interchangeable: the worst angle is large, the error stays near optimal)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_bench_nullspace(bench_nullspace()))
