"""Null-space projection, step 3 and its measurement: keep the active stack out of V while it trains,
make the stored stack itself write nothing into V (strict mode), and measure how much it still does.

    δ [T, d_out] ──► δ V [T, K] ──► (δ V) Vᵀ [T, d_out] ──► δ − (δ V) Vᵀ   (orthogonal to every column of V)

V comes from nullspace.py (steps 1–2: the frozen stacks' output directions, by randomized SVD).

Why the reference mode leaks. With the forward hook the gradient of each B_i is P (∂L/∂δ')(s g_i A_i x)ᵀ
(P = I − VVᵀ), so its columns lie in the complement of V, and so does Adam's first moment, a sum of such
gradients; weight decay, B ← (1 − lr·wd) B, is a scaling. Plain SGD would therefore keep B in the
complement for ever (a test checks it). But Adam's step is m / (√v + ε) *elementwise*: dividing
coordinate by coordinate rotates the update out of the subspace, so every step writes a little into V.
The training forwards never see it (they use δ P = δ(P B)); the evaluations (eval mode, unprojected)
and, once the stack is frozen, inference do: the stored B writes into V.

Why strict mode projects B after every step. The forward only ever sees P B, so with the hook on, the
training trajectory (gradients, Adam's moments, P B itself) is the same whether B is projected after
every step or once before freezing — a test shows the two agree to rounding. Projecting after every
step is the robust form of the same thing: every snapshot the best-stack guard keeps is already clean,
and it stays correct without the forward hook (Adam then sees unprojected gradients, but the B it
updates is put back into the complement each time, so no step's forward ever writes into V).

This file implements
  - `project_out`, `Projection`, `attach_projection`, `detach_projection`    step 3, in forward
  - `strict_project_`, `make_after_step`                                    strict enforcement
  - `leakage`, `layer_leakage`, `model_leakage`                            ‖δV‖/‖δ‖, the measurement
  - `subspace_similarity`, `singular_spectra`, `orthogonality_by_projection`   data for the figures
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from ..stacks.layer import StackedLinear
from .nullspace import ENFORCEMENTS, PAD_ID, collect_deltas, inference_configuration, run_with_hooks, stacks_delta
from .examples import ExampleSet


# -- step 3: projection in forward, and strict enforcement on B -------------------------------------------


def project_out(delta: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """δ (I − V Vᵀ) for δ [..., d_out], V [d_out, K]: two thin matmuls, O(d_out·K) per token, not O(d_out²).

    The same as running the adapter with every B_i replaced by P B_i = B_i − V (Vᵀ B_i) — value and
    gradients (a test checks both) — which would cost d_out·K·E·r once per forward instead of per token;
    `bench nullspace` measures what the per-token form costs."""
    return delta - (delta @ V) @ V.T  # [..., K] @ [K, d_out]


class Projection:
    """The `project_active` hook of one StackedLinear: δ ↦ project_out(δ, V).

    training_only=True reproduces the released code, which projects only in training-mode forwards (so
    even the validation evals inside a round see the active stack unprojected)."""

    def __init__(self, V: torch.Tensor, layer: StackedLinear | None = None):
        self.V, self.layer = V, layer  # layer is set only for training_only

    def basis(self, training: bool) -> torch.Tensor | None:
        """What StackedLinear asks: the directions to keep the active stack out of, or None (no projection)."""
        return None if self.layer is not None and not training else self.V

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        """The same projection applied to a delta directly (the obvious form, for tests and notebooks)."""
        V = self.basis(self.layer.training if self.layer is not None else True)
        return delta if V is None else project_out(delta, V)

    def __repr__(self) -> str:
        return f"Projection(K={self.V.shape[1]} of {self.V.shape[0]}, training_only={self.layer is not None})"


def _named_layers(model: nn.Module, basis: dict[str, torch.Tensor]) -> list[tuple[str, StackedLinear, torch.Tensor]]:
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, StackedLinear)]
    missing = [name for name, _ in layers if name not in basis]
    if missing:
        raise ValueError(f"the basis has no directions for {missing[:3]}{'…' if len(missing) > 3 else ''}: "
                         f"was it built on another model? Rebuild it with build_basis(model, ...)")
    return [(name, m, basis[name]) for name, m in layers]


def attach_projection(model: nn.Module, basis: dict[str, torch.Tensor], training_only: bool = False) -> None:
    """Project the active stack's delta in every StackedLinear's forward (training and inference), or
    with training_only=True in training-mode forwards only (the released code; continual's reference mode)."""
    for _, layer, V in _named_layers(model, basis):
        if V.shape[0] != layer.out_features:
            raise ValueError(f"basis of width {V.shape[0]} for a layer with {layer.out_features} outputs")
        layer.project_active = Projection(V, layer if training_only else None)


def detach_projection(model: nn.Module) -> None:
    for layer in model.modules():
        if isinstance(layer, StackedLinear):
            layer.project_active = None


@torch.no_grad()
def strict_project_(model: nn.Module, basis: dict[str, torch.Tensor]) -> None:
    """B ← B − V (Vᵀ B) for every expert of every active adapter, in place.

    Each token's delta is a combination of the columns of the B_i (Δ = s Σ g_i B_i (A_i x)), so once
    those columns are orthogonal to V the stack writes nothing into V, whatever A, the router or x."""
    for _, layer, V in _named_layers(model, basis):
        if layer.active is None:
            continue
        B = layer.active.lora_B  # MoELoRA [E, d_out, r] or LoRA [d_out, r]; the matmul broadcasts over E
        B -= V @ (V.T @ B)  # [d_out, K] @ [.., K, r]


def make_after_step(basis: dict[str, torch.Tensor], mode: str = "strict") -> Callable[[nn.Module], None] | None:
    """The `after_step` for `train_round`: strict projection of B after every optimizer step, or None.

    Call `attach_projection` before the round: in strict mode in every forward (the stack it evaluates is
    the one it stores, B being projected), in reference mode with training_only=True, as the released code
    does, so that its evaluations too see the stack as stored. Freezing moves the adapter out of the
    layer's `active` slot, beyond the reach of `project_active`: a frozen stack always runs as stored.
    That is the released code's situation (it does not save V), and why only strict mode, which makes
    the stored B itself orthogonal, keeps the protection at inference."""
    if mode not in ENFORCEMENTS:
        raise ValueError(f"unknown enforcement {mode!r}; choose one of {ENFORCEMENTS}")
    return (lambda model: strict_project_(model, basis)) if mode == "strict" else None


# -- measurement -----------------------------------------------------------------------------------------


@torch.no_grad()
def leakage(delta_fn: Callable, V: torch.Tensor, x: torch.Tensor) -> float:
    """‖δ(x) V‖_F / ‖δ(x)‖_F: the fraction of a delta's norm inside span(V) (0 = fully protected).

    `delta_fn` is an adapter (returning AdapterOutput) or any function returning δ [..., d_out].
    A delta that is exactly zero writes nothing anywhere: its leakage is 0."""
    out = delta_fn(x)
    delta = getattr(out, "delta", out).reshape(-1, V.shape[0])  # [T, d_out]
    norm = delta.norm()
    return 0.0 if norm == 0 else float((delta @ V).norm() / norm)


@torch.no_grad()
def layer_leakage(model: nn.Module, basis: dict[str, torch.Tensor], data: ExampleSet, domain: str | None = None,
                  max_examples: int | None = None, pad_id: int = PAD_ID) -> dict[str, float]:
    """{layer name: leakage} over the real tokens of `data`, in eval mode, ungated.

    domain: whose frozen stacks to measure; None measures the active stack *as the layer applies it*
    (through `project_active` when one is attached)."""
    num: dict[str, float] = {}
    den: dict[str, float] = {}

    def measure(name: str, V: torch.Tensor) -> Callable:
        def hook(layer: StackedLinear, x: torch.Tensor, mask: torch.Tensor) -> None:
            x = x[mask]  # [T_real, d_in]
            if domain is None:
                delta = layer.active(x).delta
                delta = delta if layer.project_active is None else layer.project_active(delta)
            else:
                delta = stacks_delta(layer, x, [domain])
            num[name] = num.get(name, 0.0) + float((delta @ V).norm() ** 2)  # Frobenius² adds over batches
            den[name] = den.get(name, 0.0) + float(delta.norm() ** 2)
        return hook

    with inference_configuration(model, hide_active=False):
        named = _named_layers(model, basis)
        if domain is None and any(layer.active is None for _, layer, _ in named):
            raise ValueError("layer_leakage(domain=None) measures the active stack, but there is none")
        run_with_hooks(model, [(layer, measure(name, V)) for name, layer, V in named], data, max_examples, pad_id)
    return {name: (num[name] / den[name]) ** 0.5 if den[name] > 0 else 0.0 for name in num}


def model_leakage(model: nn.Module, basis: dict[str, torch.Tensor], data: ExampleSet, domain: str | None = None,
                  max_examples: int | None = None) -> float:
    """`layer_leakage` averaged over the wrapped layers."""
    per = layer_leakage(model, basis, data, domain, max_examples)
    return sum(per.values()) / len(per)


# -- data for the figures --------------------------------------------------------------------------------


def subspace_similarity(bases: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
    """[D, D] (domains in dict order): for each pair, max |cos| between their subspaces, i.e. the largest
    singular value of V_aᵀ V_b (the cosine of the smallest principal angle), averaged over the layers."""
    domains = list(bases)
    names = list(bases[domains[0]])
    sim = torch.zeros(len(domains), len(domains))
    for i, a in enumerate(domains):
        for j, b in enumerate(domains):
            sim[i, j] = sum(torch.linalg.svdvals(bases[a][n].T @ bases[b][n])[0] for n in names) / len(names)
    return sim


def singular_spectra(model: nn.Module, data: ExampleSet, domains: list[str] | None = None, k: int | None = None,
                     max_examples: int | None = None) -> dict[str, torch.Tensor]:
    """{layer name: singular values of D} (the first k, largest first): how many directions a stack uses."""
    return spectra_of(collect_deltas(model, data, domains, max_examples), k)


def spectra_of(deltas: dict[str, torch.Tensor], k: int | None = None) -> dict[str, torch.Tensor]:
    """{layer name: the first k singular values of its D} from deltas already collected."""
    return {name: torch.linalg.svdvals(D)[:k] for name, D in deltas.items()}


def orthogonality_by_projection(model: nn.Module, basis: dict[str, torch.Tensor], data: ExampleSet,
                                domain: str | None = None, max_examples: int | None = None) -> dict[str, dict]:
    """How orthogonal a stack's delta is to the earlier basis, 1 − leakage, per layer index and per
    projection type (q_proj, …, down_proj), each averaged over the other:
    {"by_layer": {layer index: ..}, "by_projection": {"q_proj": .., ...}}."""
    per = layer_leakage(model, basis, data, domain, max_examples)
    by_layer: dict[int, list[float]] = {}
    by_proj: dict[str, list[float]] = {}
    for name, leak in per.items():
        idx = next((int(p) for p in name.split(".") if p.isdigit()), 0)  # "layers.3.self_attn.q_proj" -> 3
        by_layer.setdefault(idx, []).append(1 - leak)
        by_proj.setdefault(name.split(".")[-1], []).append(1 - leak)
    mean = lambda d: {key: sum(v) / len(v) for key, v in d.items()}
    return {"by_layer": mean(by_layer), "by_projection": mean(by_proj)}
