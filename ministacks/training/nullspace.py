"""Null-space projection: keep a new domain's stack out of the output directions earlier stacks use (docs/brainstacks.md §5).

Before training domain d (not the first), for every wrapped projection (d_out outputs):

 1. record the frozen stacks' output delta on n examples, averaged over each example's real tokens:
        D ∈ R^{n × d_out},   D[i] = mean_{t ∈ example i}  Σ_{frozen stacks j} Δ_j(x_t)
 2. take its top-K right singular vectors by randomized SVD (no mean-centring):
        D ≈ U_K S_K V_Kᵀ,    V ∈ R^{d_out × K},  VᵀV = I
 3. while d trains, its stack's delta δ (a row vector per token) is projected onto their complement:
        δ ← δ (I − V Vᵀ) = δ − (δ V) Vᵀ        (two thin matmuls; the d_out × d_out P is never formed)

    δ [T, d_out] ──► δ V [T, K] ──► (δ V) Vᵀ [T, d_out] ──► δ − (δ V) Vᵀ   (orthogonal to every column of V)

Paper vs released code (defaults first; docs/brainstacks.md §5):
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

This file implements
  - `randomized_svd`            Halko, Martinsson & Tropp (2011), by hand
  - `collect_deltas`            step 1, with forward hooks
  - `domain_bases`, `orthonormal_union`, `build_basis`, `capacity_report`   step 2 and the two modes
  - `directions_per_domain`, `capacity_by_projection`, `capacity_warning`   the capacity cap
and projection.py implements step 3 (the projection while training, strict enforcement on B) and
the measurements (leakage, subspace similarity, spectra, orthogonality).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

from ..runtime import training_state
from ..stacks.layer import StackedLinear, StacksOn
from ..lm.tokenizer import PAD, SPECIAL_TOKENS
from .examples import ExampleSet

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
    protected too. When min(n, d) ≤ 2k a sketch saves nothing, and the full SVD is exact (docs/brainstacks.md §5: n ≤ 2K).
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
def inference_configuration(model: nn.Module, hide_active: bool) -> Iterator[list[tuple[str, StackedLinear]]]:
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


def stacks_delta(layer: StackedLinear, x: torch.Tensor, domains: list[str] | None) -> torch.Tensor:
    """Σ of the given domains' frozen stacks' deltas at weight 1 (None: every frozen stack), x [..., d_in]."""
    x = x.float()  # the stacks compute in fp32 under a bf16 base too (StackedLinear._forward_in_fp32)
    if domains is None:  # ungated: exactly the layer's own frozen delta (set by inference_configuration)
        delta = layer.frozen_delta_loop(x)
    else:
        delta = None
        for adapter in (a for d in domains if d in layer.stacks for a in layer.stacks[d]):
            delta = adapter(x).delta if delta is None else delta + adapter(x).delta
    if delta is None:
        raise ValueError(f"no frozen stack of {domains or 'any domain'} in this layer: freeze a stack first")
    return delta


@torch.no_grad()
def run_with_hooks(model: nn.Module, hooks: list[tuple[StackedLinear, Callable]], data: ExampleSet,
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
            delta = stacks_delta(layer, x, domains)  # [b, T, d_out]
            m = mask.unsqueeze(-1).to(delta.device, delta.dtype)  # [b, T, 1]
            rows.setdefault(name, []).append((delta * m).sum(1) / m.sum(1).clamp_min(1))  # [b, d_out]
        return hook

    with inference_configuration(model, hide_active=True) as layers:
        for _, layer in layers:
            missing = [d for d in domains or [] if d not in layer.stacks]
            if missing:
                raise ValueError(f"domain(s) {missing} have no frozen stack; "
                                 f"the model's domains are {list(layer.stacks)}")
        run_with_hooks(model, [(layer, record(name)) for name, layer in layers], data, max_examples, pad_id)
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


def top_directions(D: dict[str, torch.Tensor], k: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
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
    return {d: top_directions(collect_deltas(model, new_domain_data or data, [d], max_examples), k, g)
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
    top = top_directions(D, k, torch.Generator().manual_seed(seed))
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
                         "earlier domains may protect (ContinualConfig in ministacks/training/continual.py)")
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
