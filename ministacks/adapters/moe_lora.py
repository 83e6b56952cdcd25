"""MoE-LoRA: N small LoRA experts and a noisy top-k router, one delta Δ of a Brainstacks stack (docs/brainstacks.md §1).

This file implements
  - `MoELoRA`                : Δ(x) = s · Σ_i g_i(x) · B_i A_i x, returning the load-balance loss beside it
  - `route`                  : logits -> gates, for the three routings ("top_k", "dense", "top_p")
  - `load_balance_loss`      : the Switch-Transformer auxiliary loss L_aux = N · Σ_e P_e · f_e
  - `moe_lora_param_count`, `stack_param_count`, and the projection shapes of TinyLlama-1.1B and
    Gemma 3 12B, which reproduce the paper's parameter counts (53.6M, 50.5M, 276.7M)

The math, for one token x ∈ R^{d_in} (N = 4 experts of rank r = 16, k = 2, s = α/√r = 16/4 = 4):

    logits = W_r x + softplus(W_n x) ⊙ ε,   ε ~ N(0, I)    (ε only in training: noisy gating, Shazeer 2017)
    g      = softmax over the k largest logits, 0 elsewhere   (exactly k non-zero gates, summing to 1)
    Δ(x)   = s · Σ_i g_i · B_i A_i x                      A_i ∈ R^{r×d_in}, B_i ∈ R^{d_out×r} (B_i = 0 at init)

                               x [T, d_in]
                                    │
                                    ▼   ONE matmul with [A_1; ..; A_N; W_r; W_n]  [N·r + 2N, d_in]
      ┌─────────────────────────────┼──────────────────────────┐
      ▼                             ▼                          ▼
  h = A x  [T, N·r]          W_r x  [T, N]              W_n x  [T, N]
  (N blocks of r columns)           │                          │ softplus(.) ⊙ ε   (training only)
      │                             └───────► + ◄──────────────┘
      │                                       │ logits [T, N]
      │                                       ▼ top-k, softmax over the kept logits
      │                                 gates g [T, N]   (k non-zero per row)
      ▼                                       │
  block i of h  ×  s · g_i   ◄────────────────┘    (unselected experts: × 0)
      │
      ▼   ONE matmul with [B_1 | .. | B_N]  [d_out, N·r]
  Δ [T, d_out]

Why this is as fast as one LoRA of rank N·r. Σ_i g_i B_i A_i x = B (g ⊗ 1_r ⊙ (A x)) with A the N
experts' A_i stacked into one [N·r, d_in] matrix and B their B_i side by side, [d_out, N·r]. So the
whole mixture is two dense matmuls of exactly the shapes of a rank-N·r LoRA (4 x 16 = 64), with an
elementwise multiply between them; unselected experts get gate 0 and contribute nothing. The router
and noise projections are two more [N, d_in] blocks of rows, so they are stacked on A and cost no
extra matmul: one [T, d_in] @ [d_in, N·r + 2N] product gives h, the clean logits and the noise
logits at once. (A matmul only N = 4 columns wide is a poor use of a CPU: on the default model and
2 cores, a whole training step measured 1.08x the LoRA's with this fusion, 1.12x with the router and
noise in a separate [2N, d_in] matmul, 1.13x with three matmuls.) No gather/scatter of tokens, no
Python loop over experts.

The released Brainstacks code instead computes every expert's full output, einsum('tf,erf->ter') then
einsum('ter,eor->teo'), a [T, N, d_out] tensor (N times the size of the layer's output) that is then
weighted by mostly-zero gates and summed; the paper measured MoE-LoRA 2.1x slower per step than the
single LoRA. The FLOPs are the same; their order and the intermediate tensor are what cost
(`bench/moe.py` measures the two forms side by side).

Computing every expert's A_i x for every token is not waste worth removing: sparse dispatch (gather
each expert's tokens, run it, scatter back, as large MoE layers do) would save half the adapter FLOPs
of top-2-of-4, but at rank 16 the matmuls are so thin that the gathers, scatters and per-expert calls
cost more than they save: measured 1.8-2.1x the rank-64 LoRA per layer (forward + backward), against
1.2x for the dense form here.

Load balance (Switch Transformer, Fedus et al. 2021):

    L_aux = N · Σ_e P_e · f_e,   P_e = mean over tokens of softmax(logits)_e   (differentiable)
                                 f_e = fraction of tokens routed to e           (counts: no gradient)

P uses the softmax over ALL N logits, the noisy ones in training (the logits that made the routing
decision, as in the released code). With k of N experts per token Σ_e f_e = k; perfectly uniform
routing (P_e = 1/N, f_e = k/N) gives L_aux = k, and a router that sends everything to the same k
experts drives it towards N. The released code detaches P, so its L_aux has no gradient and the
λ · L_aux term silently does nothing; ministacks keeps the gradient, `detach_aux=True` reproduces
the no-op. With `routing="dense"` every expert gets every token (f_e = 1), so L_aux = N · Σ P_e = N
exactly: a constant with zero gradient, as it should be when there is nothing to balance.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lora import AdapterOutput, lora_param_count, lora_scaling, project_columns

ROUTINGS = ("top_k", "dense", "top_p")


# --------------------------------------------------------------------------------------- routing


def route(logits: torch.Tensor, routing: str = "top_k", top_k: int = 2, top_p: float = 0.75
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits [T, N] -> (gates [T, N], dispatch [T, N] bool, probs [T, N]).

    probs = softmax over all N logits (the P of the load-balance loss). Each routing only chooses the
    set of experts a token is sent to (`dispatch`); the gates are probs restricted to that set and
    renormalised to sum to 1:
      top_k : the k largest logits (Shazeer et al. 2017; the paper's routing)
      dense : every expert (LoRAMoE style); gates = probs
      top_p : sort probs, keep experts until their cumulative probability reaches top_p, at least one
              ("Harder Tasks Need More Experts", An et al. 2024)
    For top-k this is exactly "softmax over the kept logits":  e^{l_i} / Σ_{j kept} e^{l_j}
    = p_i / Σ_{j kept} p_j, since the common denominator Σ_all e^{l_j} cancels. One softmax serves
    all three routings and the aux loss.
    """
    probs = logits.softmax(dim=-1)  # [T, N]
    if routing == "dense":
        return probs, torch.ones_like(logits, dtype=torch.bool), probs
    if routing == "top_k":
        idx = logits.detach().topk(top_k, dim=-1).indices  # [T, k]; choosing is not differentiable
        dispatch = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
    elif routing == "top_p":
        sorted_p, idx = probs.detach().sort(dim=-1, descending=True)  # [T, N]
        # keep the j-th most probable expert iff the ones before it have not yet reached top_p;
        # the first has 0 before it, so every token keeps at least one expert
        keep_sorted = sorted_p.cumsum(dim=-1) - sorted_p < top_p
        dispatch = torch.zeros_like(keep_sorted).scatter_(-1, idx, keep_sorted)
    else:
        raise ValueError(f"unknown routing {routing!r}; choose one of {ROUTINGS}")
    kept = probs * dispatch  # [T, N], zero outside the chosen set
    # the gradient flows through probs only: the router learns through the gates of the chosen experts
    return kept / kept.sum(dim=-1, keepdim=True), dispatch, probs


def load_balance_loss(probs: torch.Tensor, dispatch: torch.Tensor, detach: bool = False) -> torch.Tensor:
    """L_aux = N · Σ_e P_e · f_e from probs [T, N] and dispatch [T, N] (see the module docstring).

    `detach=True` is the released code's form: no gradient reaches the router."""
    n_experts = probs.shape[-1]
    P = probs.mean(dim=0)  # [N] mean router probability; differentiable
    f = dispatch.float().mean(dim=0)  # [N] fraction of tokens sent to each expert; sums to k for top-k
    if detach:
        P = P.detach()
    return n_experts * (P * f).sum()


# --------------------------------------------------------------------------------------- module


class MoELoRA(nn.Module):
    """N LoRA experts of rank r behind a noisy router; forward returns AdapterOutput(delta, aux_loss).

    Parameters (peft names where the concept is the same):
      lora_A  [N, r, d_in]   each expert's A, Kaiming-uniform like nn.Linear
      lora_B  [N, d_out, r]  zeros: a fresh MoE-LoRA is an exact identity
      router  nn.Linear(d_in, N), init N(0, 0.02): small logits, so the first routing is near uniform
      noise   nn.Linear(d_in, N), init 0: the noise std softplus(W_n x) starts at ln 2 for every expert
    """

    def __init__(self, d_in: int, d_out: int, n_experts: int = 4, r: int = 16, top_k: int = 2,
                 lora_alpha: float = 16, use_rslora: bool = True, routing: str = "top_k",
                 top_p: float = 0.75, detach_aux: bool = False):
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing {routing!r}; choose one of {ROUTINGS}")
        if routing == "top_k" and not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and n_experts={n_experts}")
        if routing == "top_p" and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        if r < 1 or n_experts < 1:
            raise ValueError(f"need r >= 1 and n_experts >= 1, got r={r}, n_experts={n_experts}")
        self.d_in, self.d_out, self.n_experts, self.r = d_in, d_out, n_experts, r
        self.top_k, self.routing, self.top_p, self.detach_aux = top_k, routing, top_p, detach_aux
        self.lora_alpha, self.use_rslora = lora_alpha, use_rslora
        self.scaling = lora_scaling(lora_alpha, r, use_rslora)
        self.lora_A = nn.Parameter(torch.empty(n_experts, r, d_in))
        self.lora_B = nn.Parameter(torch.empty(n_experts, d_out, r))
        self.router = nn.Linear(d_in, n_experts, bias=False)
        self.noise = nn.Linear(d_in, n_experts, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for A in self.lora_A:  # per expert: kaiming on the 3-D tensor would take fan_in = r * d_in
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        nn.init.normal_(self.router.weight, std=0.02)
        nn.init.zeros_(self.noise.weight)

    def noisy_logits(self, clean: torch.Tensor, noise_logits: torch.Tensor,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
        """logits = W_r x + softplus(W_n x) ⊙ ε in training mode, W_r x in eval mode.

        `noise` is ε [T, N]; None draws it from torch's global generator (`torch.randn`), so seeding
        torch fixes it. Pass it explicitly to replay the exact same routing (the parity tests do)."""
        if not self.training:
            return clean
        eps = torch.randn_like(clean) if noise is None else noise.reshape(clean.shape)
        return clean + F.softplus(noise_logits) * eps

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None,
                out_basis: torch.Tensor | None = None) -> AdapterOutput:
        """x [..., d_in] -> AdapterOutput(delta [..., d_out], aux_loss []). `noise`: see `noisy_logits`.
        `out_basis` V [d_out, K]: every expert's B becomes B_i − V(VᵀB_i), which projects the delta out of V
        (null-space projection, training/projection.py) for d_out·K·N·r multiplies per forward instead of per token."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"MoELoRA expects inputs [..., {self.d_in}], got {tuple(x.shape)}")
        E, R = self.n_experts, self.r
        lead = x.shape[:-1]
        x = x.reshape(-1, self.d_in)  # [T, F], T = all leading dims
        T = x.shape[0]

        # One matmul for the experts' A, the router and the noise projection: [A_1; ..; A_N; W_r; W_n]
        W = torch.cat([self.lora_A.reshape(E * R, self.d_in), self.router.weight, self.noise.weight])
        # T tokens, F d_in, E experts, R rank:  [T, F] @ [F, E*R + 2E] -> [T, E*R + 2E]
        out = x @ W.t()
        h, clean, noise_logits = out.split([E * R, E, E], dim=-1)  # [T, E*R], [T, E], [T, E]

        logits = self.noisy_logits(clean, noise_logits, noise)
        gates, dispatch, probs = route(logits, self.routing, self.top_k, self.top_p)
        aux = load_balance_loss(probs, dispatch, detach=self.detach_aux)

        # Scale expert i's r columns of h by s * g_i (zero for unselected experts): [T, E, R] * [T, E, 1]
        hg = (h.view(T, E, R) * (gates * self.scaling).unsqueeze(-1)).reshape(T, E * R)
        # B_1 .. B_N side by side, column block i = B_i: [E, O, R] -> [O, E*R] (a small copy of B)
        B = self.lora_B if out_basis is None else project_columns(self.lora_B, out_basis)  # [E, O, R]
        B = B.permute(1, 0, 2).reshape(self.d_out, E * R)
        # T tokens, O d_out:  [T, E*R] @ [E*R, O] -> [T, O]
        delta = hg @ B.t()
        return AdapterOutput(delta.view(*lead, self.d_out), aux)

    def gates(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The gate matrix [T, N] for x [..., d_in] (T = all leading dims flattened), for tests and plots."""
        x = x.reshape(-1, self.d_in)
        logits = self.noisy_logits(self.router(x), self.noise(x), noise)
        return route(logits, self.routing, self.top_k, self.top_p)[0]

    def extra_repr(self) -> str:
        how = {"top_k": f"top_k={self.top_k}", "dense": "dense", "top_p": f"top_p={self.top_p}"}[self.routing]
        return (f"d_in={self.d_in}, d_out={self.d_out}, n_experts={self.n_experts}, r={self.r}, {how}, "
                f"lora_alpha={self.lora_alpha}, use_rslora={self.use_rslora} (scaling={self.scaling:g}), "
                f"detach_aux={self.detach_aux}")


# --------------------------------------------------------------------------------------- counting


def moe_lora_param_count(d_in: int, d_out: int, n_experts: int = 4, r: int = 16) -> int:
    """N experts' A and B, N * r * (d_in + d_out), plus router and noise projection, 2 * N * d_in."""
    return n_experts * r * (d_in + d_out) + 2 * n_experts * d_in


def llama_projection_dims(hidden: int, intermediate: int, n_heads: int, n_kv_heads: int,
                          head_dim: int) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of the 7 projections of a Llama/Gemma decoder layer, keyed by their HF names.

    q and o use n_heads * head_dim, which need not equal `hidden` (Gemma 3 12B: 16 * 256 = 4096 != 3840);
    k and v use n_kv_heads * head_dim (grouped-query attention)."""
    q, kv = n_heads * head_dim, n_kv_heads * head_dim
    return {
        "q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
        "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }


# TinyLlama-1.1B (config.json of TinyLlama/TinyLlama-1.1B-*): hidden 2048, intermediate 5632,
# 32 heads / 4 kv heads of 64, 22 layers. The paper's Exp. 1-2 base.
TINYLLAMA_DIMS = llama_projection_dims(2048, 5632, n_heads=32, n_kv_heads=4, head_dim=64)
TINYLLAMA_N_LAYERS = 22
# Gemma 3 12B (text config of google/gemma-3-12b-it): hidden 3840, intermediate 15360,
# 16 heads / 8 kv heads of 256, 48 layers. The paper's Exp. 3 base.
GEMMA3_12B_DIMS = llama_projection_dims(3840, 15360, n_heads=16, n_kv_heads=8, head_dim=256)
GEMMA3_12B_N_LAYERS = 48


def stack_param_count(dims: dict[str, tuple[int, int]], n_layers: int, kind: str = "moe", **kw) -> int:
    """Parameters of one stack: one adapter on every projection in `dims`, in each of `n_layers` layers.

    kind="moe" counts `moe_lora_param_count(d_in, d_out, **kw)` (defaults N=4, r=16); kind="lora"
    counts `lora_param_count(d_in, d_out, r)` with r=64 unless given. For example
    stack_param_count(TINYLLAMA_DIMS, TINYLLAMA_N_LAYERS) = 53,616,640 (the paper's 53.6M)."""
    if kind == "moe":
        per_layer = sum(moe_lora_param_count(i, o, **kw) for i, o in dims.values())
    elif kind == "lora":
        kw.setdefault("r", 64)
        per_layer = sum(lora_param_count(i, o, **kw) for i, o in dims.values())
    else:
        raise ValueError(f"unknown adapter kind {kind!r}; choose 'moe' or 'lora'")
    return n_layers * per_layer
