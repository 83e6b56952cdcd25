"""The fused inference pass: every live frozen stack of one or more projections that read the same input,
in one pass: about a dozen ops for the whole group, where a pass per projection costs about a dozen each.

docs/brainstacks.md §2, §6. A stacked projection computes y = base(x) + Σ_s w_s Δ_s(x) (stacks/layer.py).
With S frozen adapters of E_s experts of rank r_s (a LoRA is one expert whose gate is 1), over P
projections p that share the input x (q, k, v of a layer; or gate and up):

        [h | z] = x @ [A_1; …; A_S; R_1; …; R_S]ᵀ        ONE matmul for all P      [T, Σ E·r + Σ E]
                                                        (expert activations h, router logits z)
        g = softmax(top-k of z), 0 elsewhere            one top-k for all P       [T, S, E]
        hg = h ⊙ g          (each gate over its expert's r columns, by broadcasting over a [T, S, E, r] view)
        y_p = base_p(x) + hg_p @ [w·s·B … of p]ᵀ        one addmm per projection  [T, d_out_p]

Why this shape. At one token per step (generation) the matmuls of a stack are tiny — a stack is ~5% of the
base's parameters — so what a token pays for is the number of ops, each a few microseconds of dispatch
whatever its size. The pass therefore spends ops once per *input*, not once per projection or adapter:
the A and router rows of every adapter of every projection of the group are one matrix, and the gates
of all of them are one top-k; only the B side stays per projection (`hg_p`, the columns of p's adapters,
is a view). A block-diagonal B would make that side one matmul too, but a matmul reads its whole matrix,
zeros included: P times the B side's bytes per token, to save P - 1 ops, and on a wide model the bytes
are what a token's matmuls cost.

What is folded in once, when the pass is built: the domain weights w and rsLoRA scales s scale each
adapter's columns of B, so a token pays only for its gates; A and B are laid out for `mm`/`addmm` (one op
each, where `F.linear` dispatches through four). The gates depend on x and cannot be folded.

Per-row weights (StacksOn.per_row: prompts routed apart in one batch). B holds s alone, and the weights
become one [B, C] matrix W, row b's w_d over every column of domain d's adapters: hg ⊙ W (broadcast over
each row's tokens) is one more elementwise op, and row b computes base + Σ w_b,d Δ_d exactly as alone.

Consecutive adapters with the same routing spec form one run, gated with one top-k over [T, S, E]. The
base projection is called as its own module, exactly as the base alone calls it: the pass changes only
what the stacks cost.

Inference only: the pass is built from frozen stacks in eval mode (noiseless routing, stacks/layer.py
decides when), its matrices are constants, and gradients still flow through x. Checked against the
stack-by-stack loop (`StackedLinear.frozen_delta_loop`) in tests/test_fused.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..adapters.lora import LoRA
from ..adapters.moe_lora import MoELoRA, route


def _adapter_matrices(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, tuple]:
    """(A [E·r, d_in], router [E, d_in] or None, Bᵀ [E·r, d_out], routing spec) of one adapter, as views:
    row block i of A and of Bᵀ belongs to expert i."""
    if isinstance(adapter, MoELoRA):
        E, r = adapter.n_experts, adapter.r
        return (adapter.lora_A.reshape(E * r, -1), adapter.router.weight, adapter.lora_B.transpose(1, 2),
                (E, r, adapter.top_k, adapter.routing, adapter.top_p))
    if isinstance(adapter, LoRA):
        return adapter.lora_A, None, adapter.lora_B.t(), (1, adapter.r, 1, "lora", 1.0)
    raise TypeError(f"cannot fuse a {type(adapter).__name__}: only MoELoRA and LoRA stacks have a fused pass")


def _softmax(kept: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 2 of the kept logits [T, S, k, 1]. For the paper's top-2 it is the sigmoid of the
    two logits' difference, σ(a - b) = e^a / (e^a + e^b), in three elementwise ops that run in the calling
    thread at this size. softmax over T·S rows opens a parallel region on every call, which must wait for
    a second thread to be scheduled: on 2 cores that other processes keep busy, measured at a mean of
    milliseconds per call (the sigmoid: ~15 µs), and a generated token makes 4 such calls per layer."""
    if kept.shape[2] == 2:
        return (kept - kept.flip(2)).sigmoid()
    return kept.softmax(dim=2)


@torch.no_grad()
def _scaled_rows(Bts: list[torch.Tensor], scales: list[float]) -> torch.Tensor:
    """[s_1·Bᵀ_1; s_2·Bᵀ_2; …] as one contiguous [Σ E·r, d_out] matrix, each block written once, scaled as it
    is copied: a routed answer rebuilds this for every prompt (new weights), so copies here are per prompt."""
    rows = [Bt.shape[0] * Bt.shape[1] if Bt.dim() == 3 else Bt.shape[0] for Bt in Bts]
    out = Bts[0].new_empty(sum(rows), Bts[0].shape[-1])
    for Bt, scale, block in zip(Bts, scales, out.split(rows)):
        torch.mul(Bt, scale, out=block.view(Bt.shape))
    return out


class FusedStacks:
    """base + live frozen stacks of the projections `layers` (StackedLinears that read the same input), in one pass.

    `key` is what the pass was built for (the caller compares it to decide when to rebuild). Call it with
    x [..., d_in]: a list of y_p [..., d_out_p], one per layer; `with_base=False` gives the stacks' deltas alone.
    """

    def __init__(self, layers: Sequence[nn.Module], key: tuple = ()):
        self.key = key
        self.bases = [layer.base_layer for layer in layers]
        As, Rs, specs = [], [], []
        # per layer: Bᵀ [C_p, d_out_p], every adapter's rows scaled by w·s. Stored transposed and contiguous:
        # hg [T, C_p] @ Bᵀ then streams Bᵀ row by row, measured ~1.5x faster at T=1 than through a view of B
        self.Bt: list[torch.Tensor | None] = []
        per_row = layers[0].on.rows is not None
        if per_row and any(layer.on != layers[0].on for layer in layers):
            raise ValueError("per-row stack weights in one pass need every layer of the group under the same setting")
        columns = []  # per row: each adapter's row weights over its E·r columns of hg (per_row only)
        for layer in layers:
            live = [(a, d) for d in layer.live_domains() for a in layer.stacks[d]]
            Bts, scales = [], []
            for adapter, d in live:
                A, R, Bt, spec = _adapter_matrices(adapter)
                As.append(A)
                Rs += [R] if R is not None else []
                Bts.append(Bt)
                scales.append((1.0 if per_row else layer.weight_of(d)) * adapter.scaling)
                specs.append(spec)
                if per_row:
                    columns.append(torch.tensor(layer.on.row_weights(d), dtype=A.dtype, device=A.device)
                                   [:, None].expand(-1, A.shape[0]))
            self.Bt.append(_scaled_rows(Bts, scales) if Bts else None)
        if not As:
            raise ValueError("nothing to fuse: no layer of the group has a live frozen stack")
        # runs: (E, r, k, routing, top_p, S) for S consecutive adapters with the same spec
        runs: list[list] = []
        for spec in specs:
            if runs and runs[-1][:5] == list(spec):
                runs[-1][5] += 1
            else:
                runs.append([*spec, 1])
        self.runs = [tuple(run) for run in runs]
        self.h_sizes = [S * E * r for E, r, _, _, _, S in self.runs]  # h columns of each run
        self.z_sizes = [0 if routing == "lora" else S * E for E, _, _, routing, _, S in self.runs]  # router logits
        self.hz_sizes = [sum(self.h_sizes), sum(self.z_sizes)]
        with torch.no_grad():
            # the experts' A rows and the routers' rows in one matrix: one matmul gives both (as in MoELoRA)
            self.AR = torch.cat(As + Rs)  # [Σ E·r + Σ_moe E, d_in]
        self.C = sum(self.h_sizes)  # Σ E·r over every adapter of every layer
        self.ARt = self.AR.t()  # [d_in, C + Z], for mm(x, ARt): one op where F.linear dispatches through four
        self.c_sizes = [0 if Bt is None else Bt.shape[0] for Bt in self.Bt]  # hg columns of each layer
        self.W = torch.cat(columns, dim=1) if columns else None  # [B, C]: row b's weight of every column

    def gated(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [T, F] -> every layer's gated expert activations hg_p [T, C_p] (views of one [T, C] tensor)."""
        # T tokens, F d_in, C = Σ E·r columns, Z = Σ E router logits, S stacks in a run, E experts, r rank
        h, z = torch.mm(x, self.ARt).split_with_sizes(self.hz_sizes, dim=1)  # [T, C], [T, Z]
        one = len(self.runs) == 1
        hs = (h,) if one else h.split_with_sizes(self.h_sizes, dim=1)
        zs = (z,) if one else z.split_with_sizes(self.z_sizes, dim=1)
        parts = []
        for (E, r, k, routing, top_p, S), hr, zr in zip(self.runs, hs, zs):
            if routing == "lora":  # a LoRA's gate is 1: its columns pass as they are
                parts.append(hr)
                continue
            zr = zr.view(-1, S, E, 1)  # the trailing 1: a gate broadcasts over its expert's r columns
            if routing == "top_k":
                # softmax over the k kept logits, zero elsewhere: route()'s gates
                kept, idx = zr.topk(k, dim=2)  # [T, S, k, 1]
                g = torch.zeros_like(zr).scatter_(2, idx, _softmax(kept))  # [T, S, E, 1]
            else:
                g = route(zr.view(-1, S, E), routing, k, top_p)[0].unsqueeze(-1)  # [T, S, E, 1]
            parts.append((hr.view(-1, S, E, r) * g).view(-1, S * E * r))  # [T, S·E·r]
        hg = parts[0] if one else torch.cat(parts, dim=1)
        if self.W is not None:  # per-row weights: row b's tokens scaled by W[b]
            hg = (hg.view(len(self.W), -1, self.C) * self.W[:, None, :]).view(-1, self.C)
        return [hg] if len(self.c_sizes) == 1 else list(hg.split_with_sizes(self.c_sizes, dim=1))

    def __call__(self, x: torch.Tensor, with_base: bool = True) -> list[torch.Tensor]:
        lead = x.shape[:-1]
        if self.W is not None and (len(lead) < 1 or lead[0] != len(self.W)):
            raise ValueError(f"per-row stack weights for {len(self.W)} rows, but the input's shape is {tuple(x.shape)}")
        x = x.reshape(-1, x.shape[-1])  # [T, F]
        out = []
        for base, Bt, hg in zip(self.bases, self.Bt, self.gated(x)):
            if with_base:
                y = base(x)  # [T, O]
                y = y if Bt is None else torch.addmm(y, hg, Bt)  # base + stacks in one op
            else:
                y = torch.mm(hg, Bt) if Bt is not None else x.new_zeros(len(x), base.out_features)
            out.append(y.view(*lead, -1))  # [..., O]
        return out
