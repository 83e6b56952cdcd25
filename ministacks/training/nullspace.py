"""Null-space projection: keep a new domain's stack out of the output directions earlier stacks use (spec §5).

Before training domain d (not the first), for every wrapped projection (d_out outputs):

 1. record the frozen stacks' output delta on n examples, averaged over each example's real tokens:
        D ∈ R^{n × d_out},   D[i] = mean_{t ∈ example i}  Σ_{frozen stacks j} Δ_j(x_t)
 2. take its top-K right singular vectors by randomized SVD (no mean-centring):
        D ≈ U_K S_K V_Kᵀ,    V ∈ R^{d_out × K},  VᵀV = I
 3. while d trains, its stack's delta δ (a row vector per token) is projected onto their complement:
        δ ← δ (I − V Vᵀ) = δ − (δ V) Vᵀ        (two thin matmuls; the d_out × d_out P is never formed)

    δ [T, d_out] ──► δ V [T, K] ──► (δ V) Vᵀ [T, d_out] ──► δ − (δ V) Vᵀ   (orthogonal to every column of V)

Paper vs released code (defaults first; spec §5):
  data      previous domains' validation examples              | the new domain's examples (`new_domain_data`)
  capacity  mode="per_domain": K directions of each earlier    | mode="sum": K directions of the sum of all
            domain's own stacks, united and orthonormalised     |   frozen stacks (K in all, not per domain)
            (K_total ≤ K · #domains: "each domain claims 64 of 3840 directions")
  enforce   "strict": also B ← B − V(VᵀB) for every expert     | "reference": forward projection while training
            after every optimizer step: the stored stack        |   only; V is not stored, so the frozen stack
            itself writes nothing into V                        |   runs unprojected at inference and leaks
  (the released code also skips the projection in eval-mode forwards, and so does the reference mode:
   `attach_projection(training_only=True)`, so its evaluations see the stack as it will be stored)

Capacity. Every earlier domain claims K directions of each projection's d_out, so the union grows by
up to K per domain, and a narrow projection fills up: 4 earlier domains × K = 32 protect all 128 outputs
of a k_proj with n_kv_head × head_dim = 2 × 64, and the fifth domain's k/v deltas would be exactly zero.
A cap `max_share` bounds the protected share of every projection:

    asked = K · m  (m earlier domains; K with mode="sum")         limit = ⌊max_share · d_out⌋
    K' = K                   if asked ≤ limit
    K' = ⌊limit / m⌋         otherwise: each earlier domain keeps its K' strongest directions

so every earlier domain keeps an equal claim, and the ones it keeps are those its stacks write into
most (the first columns of its V, sorted by singular value). `capacity_warning` says where it binds.

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
  - `randomized_svd`            Halko, Martinsson & Tropp (2011), by hand
  - `collect_deltas`            step 1, with forward hooks
  - `domain_bases`, `orthonormal_union`, `build_basis`, `capacity_report`   step 2 and the two modes
  - `directions_per_domain`, `capacity_by_projection`, `capacity_warning`   the capacity cap
  - `project_out`, `attach_projection`, `detach_projection`                 step 3, in forward
  - `strict_project_`, `make_after_step`                                    strict enforcement
  - `leakage`, `layer_leakage`, `model_leakage`                            ‖δV‖/‖δ‖, the measurement
  - `subspace_similarity`, `singular_spectra`, `orthogonality_by_projection`   data for the figures
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

from ..runtime import training_state
from ..stacks.layer import StackedLinear, StacksOn
from ..lm.tokenizer import PAD, SPECIAL_TOKENS
from .sft import ExampleSet

PAD_ID = SPECIAL_TOKENS.index(PAD)  # 0: every ministacks tokenizer fixes the special ids (tokenizer.py)
MODES = ("per_domain", "sum")
ENFORCEMENTS = ("strict", "reference")


# -- randomized SVD ---------------------------------------------------------------------------------


def randomized_svd(D: torch.Tensor, k: int, oversample: int = 8, n_iter: int = 2,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k SVD, D [n, d] ≈ U [n, k] · diag(S [k]) · V [d, k]ᵀ (Halko, Martinsson & Tropp 2011, alg. 4.4, 5.1).

    1. sketch the range of D with a Gaussian test matrix: Y = D Ω, Ω ∈ R^{d × (k+p)} (p = oversample)
    2. power iterations Y ← D (Dᵀ Y), re-orthonormalised by QR each half-step: they raise the spectrum
       to the power 2q+1, so the top-k directions dominate the sketch even when the spectrum decays slowly
       (without the QR the small directions would drown in rounding error)
    3. Q = qr(Y) [n, k+p] is an orthonormal basis of (almost) the top range; B = Qᵀ D [k+p, d] is small
    4. SVD of B = Ub S Vᵀ exactly; U = Q Ub
    No mean-centring: a shift every example shares is a direction the stacks write into, so it must be
    protected too. When min(n, d) ≤ 2k a sketch saves nothing, and the full SVD is exact (spec: n ≤ 2K).
    """
    n, d = D.shape
    if not 1 <= k <= min(n, d):
        raise ValueError(f"randomized_svd: k={k} must be between 1 and min(n, d) = {min(n, d)} for a "
                         f"[{n}, {d}] matrix; use more rows (examples) or a smaller k")
    if min(n, d) <= 2 * k:
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k].T
    width = min(k + oversample, n, d)
    omega = torch.randn(d, width, generator=generator, dtype=D.dtype, device=D.device)  # [d, k+p]
    Q = torch.linalg.qr(D @ omega).Q  # [n, k+p]
    for _ in range(n_iter):
        Q = torch.linalg.qr(D.T @ Q).Q  # [d, k+p]
        Q = torch.linalg.qr(D @ Q).Q  # [n, k+p]
    Ub, S, Vh = torch.linalg.svd(Q.T @ D, full_matrices=False)  # [k+p, k+p], [k+p], [k+p, d]
    return Q @ Ub[:, :k], S[:k], Vh[:k].T


# -- step 1: the frozen stacks' deltas, through hooks ---------------------------------------------------


def _selected_batches(data: ExampleSet, max_examples: int | None,
                      pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x [b, T], real-token mask [b, T]) batches, with `max_examples` rows spread evenly over the set.

    An ExampleSet is sorted by length, so "the first n" would be the n shortest examples: evenly spaced
    rows keep the length mix. Padding is on the right and uses the pad token, which no real text
    contains, so `x != pad_id` is exactly the real tokens (labels would not do: with completion_only
    the prompt's labels are IGNOREd although its tokens are real)."""
    total = sum(len(x) for x, _ in data.batches)
    n = total if max_examples is None else min(max_examples, total)
    keep = set(torch.linspace(0, total - 1, n).round().long().tolist()) if n else set()
    start = 0
    for x, _ in data.batches:
        rows = [i for i in range(len(x)) if start + i in keep]
        start += len(x)
        if rows:
            x = x[rows]
            yield x, x != pad_id


@contextlib.contextmanager
def _inference_configuration(model: nn.Module, hide_active: bool) -> Iterator[list[tuple[str, StackedLinear]]]:
    """The model as it runs while the next domain trains: eval mode, every frozen stack on at weight 1
    (ungated), optionally no active stack. Everything changed is put back on exit."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, StackedLinear)]
    if not layers:
        raise ValueError("the model has no StackedLinear layers: call inject_stacks(model) first")
    saved = [(m.on, m.active) for _, m in layers]
    with training_state(model, False):
        try:
            for _, m in layers:
                m.on = StacksOn.ungated()
                if hide_active:
                    m.active = None
            yield layers
        finally:
            for (_, m), (on, a) in zip(layers, saved):
                m.on, m.active = on, a


def _stacks_delta(layer: StackedLinear, x: torch.Tensor, domains: list[str] | None) -> torch.Tensor:
    """Σ of the given domains' frozen stacks' deltas at weight 1 (None: every frozen stack), x [..., d_in]."""
    if domains is None:  # ungated: exactly the layer's own frozen delta (set by _inference_configuration)
        delta = layer.frozen_delta_loop(x)
    else:
        delta = None
        for adapter in (a for d in domains if d in layer.stacks for a in layer.stacks[d]):
            delta = adapter(x).delta if delta is None else delta + adapter(x).delta
    if delta is None:
        raise ValueError(f"no frozen stack of {domains or 'any domain'} in this layer: freeze a stack first")
    return delta


@torch.no_grad()
def _run_with_hooks(model: nn.Module, hooks: list[tuple[StackedLinear, Callable]], data: ExampleSet,
                    max_examples: int | None, pad_id: int) -> None:
    """Run the model over `data`; each `fn(layer, x [b, T, d_in], mask [b, T] of real tokens)` sees its
    layer's input on every batch. The hooks are removed whatever happens."""
    batch_mask: dict[str, torch.Tensor] = {}
    handles = [layer.register_forward_hook(lambda lay, inputs, output, fn=fn: fn(lay, inputs[0], batch_mask["m"]))
               for layer, fn in hooks]
    try:
        for x, mask in _selected_batches(data, max_examples, pad_id):
            batch_mask["m"] = mask
            model(x)
    finally:
        for h in handles:
            h.remove()


def collect_deltas(model: nn.Module, data: ExampleSet, domains: list[str] | None = None,
                   max_examples: int | None = None, pad_id: int = PAD_ID) -> dict[str, torch.Tensor]:
    """D [n, d_out] per StackedLinear (keyed by module name): row i = the chosen frozen stacks' summed
    delta, weight 1 each, averaged over example i's real tokens (padding excluded).

    domains=None records every frozen stack. The model itself always runs ungated with every frozen
    stack on and no active stack — the configuration the next domain trains in — so the hidden states
    feeding each layer do not depend on which deltas are recorded, and the records are additive:
    collect(["a"]) + collect(["b"]) = collect(None) when a and b are the only domains."""
    rows: dict[str, list[torch.Tensor]] = {}

    def record(name: str) -> Callable:
        def hook(layer: StackedLinear, x: torch.Tensor, mask: torch.Tensor) -> None:
            delta = _stacks_delta(layer, x, domains)  # [b, T, d_out]
            m = mask.unsqueeze(-1).to(delta.dtype)  # [b, T, 1]
            rows.setdefault(name, []).append((delta * m).sum(1) / m.sum(1).clamp_min(1))  # [b, d_out]
        return hook

    with _inference_configuration(model, hide_active=True) as layers:
        for _, layer in layers:
            missing = [d for d in domains or [] if d not in layer.stacks]
            if missing:
                raise ValueError(f"domain(s) {missing} have no frozen stack; "
                                 f"the model's domains are {list(layer.stacks)}")
        _run_with_hooks(model, [(layer, record(name)) for name, layer in layers], data, max_examples, pad_id)
    if not rows:
        raise ValueError("collect_deltas: no examples in the data")
    return {name: torch.cat(r) for name, r in rows.items()}


# -- step 2: the basis ------------------------------------------------------------------------------------


def orthonormal_union(Vs: list[torch.Tensor], rtol: float | None = None) -> torch.Tensor:
    """An orthonormal basis [d_out, K] of span(V_1 ∪ V_2 ∪ …), K ≤ Σ k_i.

    SVD of the side-by-side M = [V_1 … V_m] = W Σ Zᵀ: the columns of W with σ > rtol·σ_max span the
    union, and a direction two domains share gives one σ ≈ 0 and is dropped. Plain QR (torch's has no
    column pivoting) would keep a column for it all the same, a direction made of rounding noise,
    which would then be "protected" for nothing. rtol defaults to the usual rank tolerance max(M.shape)·eps.
    """
    M = torch.cat(Vs, dim=1)  # [d_out, Σ k_i]
    W, sigma, _ = torch.linalg.svd(M, full_matrices=False)
    if rtol is None:
        rtol = max(M.shape) * torch.finfo(M.dtype).eps
    return W[:, sigma > rtol * sigma[0]]


def _top_directions(D: dict[str, torch.Tensor], k: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for name, d in D.items():
        n, d_out = d.shape
        if k > min(n, d_out):
            raise ValueError(f"{name}: cannot take k={k} directions from {n} examples of a {d_out}-wide output; "
                             f"use k ≤ {min(n, d_out)} (or more examples)")
        out[name] = randomized_svd(d, k, generator=generator)[2]  # [d_out, k]
    return out


def domain_bases(model: nn.Module, data_by_domain: dict[str, ExampleSet], k: int,
                 new_domain_data: ExampleSet | None = None, max_examples: int | None = None,
                 seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """{domain: {layer name: V_d [d_out, k]}}: the top-k output directions of each domain's own stacks, on
    its own validation examples (or on `new_domain_data` for every domain, the released code's data)."""
    g = torch.Generator().manual_seed(seed)  # its own generator: building a basis must not shift training's RNG
    return {d: _top_directions(collect_deltas(model, new_domain_data or data, [d], max_examples), k, g)
            for d, data in data_by_domain.items()}


def build_basis(model: nn.Module, data_by_domain: dict[str, ExampleSet], k: int, mode: str = "per_domain",
                new_domain_data: ExampleSet | None = None, max_examples: int | None = None,
                seed: int = 0, max_share: float | None = None) -> dict[str, torch.Tensor]:
    """{layer name: V [d_out, K]} with orthonormal columns: the output directions to protect.

    data_by_domain: the earlier domains (keys) and their validation examples (values; unused, may be None,
    when `new_domain_data` is given).
      mode="per_domain" (paper): V_d = top-k of D_d (domain d's stacks only, on d's examples), for each
                                 earlier d, then `orthonormal_union` → K ≤ k · #domains
      mode="sum" (released code): top-k of D (the sum of all frozen stacks), rows = every earlier domain's
                                 examples, one after the other → K = k
      new_domain_data: run on the new domain's examples instead (released code), in either mode.
      max_share: at most this share of each layer's d_out is protected (`directions_per_domain`);
                 None: no cap (a narrow layer may then be protected entirely).
    """
    if mode not in MODES:
        raise ValueError(f"unknown null-space mode {mode!r}; choose one of {MODES}")
    if not data_by_domain:
        raise ValueError("build_basis needs at least one earlier domain (the first domain has nothing to protect)")
    m = len(data_by_domain)
    if mode == "per_domain":
        per = domain_bases(model, data_by_domain, k, new_domain_data, max_examples, seed)
        basis = {}
        for name, V0 in next(iter(per.values())).items():
            keep = directions_per_domain(V0.shape[0], k, m, mode, max_share)
            Vs = [b[name][:, :keep] for b in per.values()]  # randomized_svd sorts by singular value: strongest first
            basis[name] = orthonormal_union(Vs) if keep else torch.zeros(V0.shape[0], 0)  # [d_out, 0]: nothing kept
        return basis
    sets = [new_domain_data] if new_domain_data is not None else list(data_by_domain.values())
    parts = [collect_deltas(model, s, None, max_examples) for s in sets]
    D = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}  # [Σ n, d_out]
    top = _top_directions(D, k, torch.Generator().manual_seed(seed))
    return {name: V[:, : directions_per_domain(V.shape[0], k, m, mode, max_share)] for name, V in top.items()}


def capacity_report(basis: dict[str, torch.Tensor]) -> dict[str, float]:
    """K / d_out per layer: the fraction of each output space later domains may no longer write into."""
    return {name: V.shape[1] / V.shape[0] for name, V in basis.items()}


# -- capacity: how much of each output space may be protected ------------------------------------------------


def directions_per_domain(d_out: int, k: int, n_domains: int, mode: str = "per_domain",
                          max_share: float | None = None) -> int:
    """K' = the directions each earlier domain keeps on a d_out-wide layer (mode="sum": K' in all).

        asked = k · n_domains (per_domain) or k (sum),   limit = ⌊max_share · d_out⌋
        K' = k when asked ≤ limit, else ⌊limit / n_domains⌋ (per_domain) or limit (sum)

    The union then protects at most K' · n_domains ≤ limit directions. max_share=None: no cap (K' = k)."""
    if mode not in MODES:
        raise ValueError(f"unknown null-space mode {mode!r}; choose one of {MODES}")
    if max_share is None:
        return k
    if not 0 < max_share <= 1:
        raise ValueError(f"ns_max_share={max_share} must be in (0, 1]: the share of each projection's outputs "
                         "earlier domains may protect (ContinualConfig in ministacks/continual.py)")
    claimants = n_domains if mode == "per_domain" else 1
    limit = int(max_share * d_out)
    return k if k * claimants <= limit else limit // claimants


def capacity_by_projection(basis: dict[str, torch.Tensor], k: int, n_domains: int, mode: str = "per_domain",
                           max_share: float | None = None) -> dict[str, dict]:
    """{layer name: {"protected", "d_out", "share", "asked", "k_per_domain", "capped"}} for a basis built
    from `n_domains` earlier domains with `build_basis(..., k, mode, max_share=max_share)`.

    protected = the basis' K (the union drops directions two domains share, so it can be below asked),
    share = protected / d_out, asked = k · n_domains (k with mode="sum"), k_per_domain = K' and
    capped = K' < k (the cap cut some domains' directions on this layer)."""
    out = {}
    for name, V in basis.items():
        d_out, protected = V.shape
        keep = directions_per_domain(d_out, k, n_domains, mode, max_share)
        out[name] = {"protected": protected, "d_out": d_out, "share": protected / d_out,
                     "asked": k * (n_domains if mode == "per_domain" else 1), "k_per_domain": keep,
                     "capped": keep < k}
    return out


def capacity_warning(domain: str, report: dict[str, dict], max_share: float | None) -> str | None:
    """One message for the whole domain, or None: the projections (by type, q_proj … down_proj) where the
    cap binds or where every output direction is protected (the new domain's delta would be zero there)."""
    by_type: dict[str, list[dict]] = {}
    for name, rec in report.items():
        if rec["capped"] or rec["protected"] >= rec["d_out"]:
            by_type.setdefault(name.split(".")[-1], []).append(rec)
    if not by_type:
        return None
    parts = []
    for proj, recs in by_type.items():
        r = max(recs, key=lambda x: x["share"])
        what = (f"K cut to {r['k_per_domain']}, {r['protected']} of {r['d_out']} protected"
                if r["capped"] else f"all {r['d_out']} outputs protected: {domain}'s delta is zero there")
        parts.append(f"{proj} ({len(recs)} layer(s), asked {r['asked']} of {r['d_out']} directions: {what})")
    cap = "no cap" if max_share is None else f"ns_max_share={max_share:g}"
    return (f"null-space capacity while training {domain} ({cap}): " + "; ".join(parts) +
            ". Lower ns_k, raise ns_max_share or widen the model (ContinualConfig in ministacks/presets.py); "
            "the manifest records it under capacity_by_projection")


# -- step 3: projection in forward, and strict enforcement on B -------------------------------------------


def project_out(delta: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """δ (I − V Vᵀ) for δ [..., d_out], V [d_out, K]: two thin matmuls, O(d_out·K) per token, not O(d_out²).

    The same as running the adapter with every B_i replaced by P B_i = B_i − V (Vᵀ B_i) — value and
    gradients (a test checks both) — which would cost d_out·K·E·r once per forward instead of per token;
    `bench_nullspace` measures what the per-token form costs."""
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
                delta = _stacks_delta(layer, x, [domain])
            num[name] = num.get(name, 0.0) + float((delta @ V).norm() ** 2)  # Frobenius² adds over batches
            den[name] = den.get(name, 0.0) + float(delta.norm() ** 2)
        return hook

    with _inference_configuration(model, hide_active=False):
        named = _named_layers(model, basis)
        if domain is None and any(layer.active is None for _, layer, _ in named):
            raise ValueError("layer_leakage(domain=None) measures the active stack, but there is none")
        _run_with_hooks(model, [(layer, measure(name, V)) for name, layer, V in named], data, max_examples, pad_id)
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
    deltas = collect_deltas(model, data, domains, max_examples)
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
