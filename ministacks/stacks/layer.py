"""The stacked layer: a frozen base projection plus frozen adapter stacks plus one active stack.

docs/brainstacks.md §0, §2. Every wrapped projection (q, k, v, o, gate, up, down of every layer) computes

        y = base(x)  +  Σ_domains w_d · Σ_{stacks j of d} Δ_j(x)  +  Δ_active(x)

            x ──► base_layer (frozen, fp32 or 4-bit) ─────────────────────┐
            │                                                             ▼
            ├──► frozen stacks of "chat"  (no grad, eval mode) ── × w_chat ──► (+) ──► y
            ├──► frozen stacks of "code"  ...                 ── × w_code ──►  ▲
            └──► active stack (the one being trained) ─────────────────────────┘

A *stack* is one adapter (MoE-LoRA, or a single LoRA for the baseline) in every wrapped projection.
The functions below act on all StackedLinear modules of a model at once, so "add a stack", "freeze
it", "route to these domains" are one call each, on our model and on a Hugging Face one alike.

- Adding a stack changes nothing: its B matrices start at zero, so Δ = 0 exactly.
- Freezing sets requires_grad=False *and* eval mode (no routing noise). The released code leaves
  frozen stacks in train mode, so they keep routing noisily while later stacks train;
  `freeze_active(..., keep_train_mode=True)` reproduces that.
- Which frozen stacks run is one `StacksOn` (ungated, weighted, or the base alone); a domain at or
  below `SKIP_THRESHOLD` (0.12, docs/brainstacks.md §6) is skipped entirely — no compute at all.
- Inference over many frozen stacks runs as one fused pass (see `FusedStacks`), checked against the
  stack-by-stack loop in the tests.

Why the aux loss is stashed on the layer: the wrapped model calls `proj(x)` and expects a tensor back,
so the adapter's explicit `AdapterOutput.aux_loss` cannot travel up through an unmodified model
(ours or Hugging Face's). Each StackedLinear keeps the last one; `aux_loss(model)` sums them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adapters.lora import LoRA
from ..lm.model import PROJECTION_NAMES
from ..adapters.moe_lora import MoELoRA, route

@dataclass(frozen=True)
class AdapterConfig:
    n_experts: int = 4  # paper: 4 LoRA experts per projection
    r: int = 16  # rank of each expert (paper: 16)
    top_k: int = 2  # experts per token (paper: noisy top-2)
    lora_alpha: float = 16.0  # scale s = alpha / sqrt(r) = 4 with rsLoRA (paper)
    use_rslora: bool = True
    routing: str = "top_k"  # "top_k" (paper), "dense" or "top_p" (beyond the paper)
    top_p: float = 0.75  # for routing="top_p"
    detach_aux: bool = False  # True reproduces the released code's aux loss, which has no gradient
    lora_r: int = 64  # the parameter-matched single LoRA baseline: rank n_experts * r (paper: 64)


def make_adapter(kind: str, cfg: AdapterConfig = AdapterConfig()) -> Callable[[int, int], nn.Module]:
    """A factory `(d_in, d_out) -> adapter` for `add_stack`: kind "moe" (MoE-LoRA) or "lora" (single LoRA)."""
    if kind == "moe":
        return lambda d_in, d_out: MoELoRA(d_in, d_out, n_experts=cfg.n_experts, r=cfg.r, top_k=cfg.top_k,
                                           lora_alpha=cfg.lora_alpha, use_rslora=cfg.use_rslora,
                                           routing=cfg.routing, top_p=cfg.top_p, detach_aux=cfg.detach_aux)
    if kind == "lora":
        return lambda d_in, d_out: LoRA(d_in, d_out, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, use_rslora=cfg.use_rslora)
    raise ValueError(f"unknown adapter kind {kind!r}: use 'moe' or 'lora'")


TARGET_MODULES = PROJECTION_NAMES  # peft's name for "which modules get adapters"
SKIP_THRESHOLD = 0.12  # a domain whose weight is at or below this costs nothing (docs/brainstacks.md §6, inference rule)


@dataclass(frozen=True)
class StacksOn:
    """Which frozen stacks run, and with which weight: the one description every mode and route uses.

        StacksOn.ungated()            every domain's stacks at weight 1 (what continual training measures)
        StacksOn.weighted({d: w})     those domains at those weights; a domain absent is 0, and one at or
                                      below SKIP_THRESHOLD is skipped (it costs nothing)
        StacksOn.base_only()          nothing but the base: no frozen and no active stack

    `as_json()` is how results record it: None (ungated), {} (base) or the weights, as eval.json and
    the CLI print them."""

    weights: tuple[tuple[str, float], ...] | None = None  # None: ungated; else (domain, weight) pairs
    base: bool = False

    @classmethod
    def ungated(cls) -> StacksOn:
        return cls()

    @classmethod
    def base_only(cls) -> StacksOn:
        return cls(weights=(), base=True)

    @classmethod
    def weighted(cls, weights: dict[str, float]) -> StacksOn:
        return cls(weights=tuple((d, float(w)) for d, w in weights.items()))

    @classmethod
    def from_json(cls, weights: dict[str, float] | None) -> StacksOn:
        """The inverse of as_json: None is ungated, {} the base alone, a dict those weights."""
        if weights is None:
            return cls.ungated()
        return cls.weighted(weights) if weights else cls.base_only()

    def weight_of(self, domain: str) -> float:
        if self.base:
            return 0.0
        return 1.0 if self.weights is None else dict(self.weights).get(domain, 0.0)

    def as_json(self) -> dict[str, float] | None:
        if self.base:
            return {}
        return None if self.weights is None else dict(self.weights)


def set_stacks(model: nn.Module, on: StacksOn) -> None:
    """Every layer of `model` runs `on` from now on (`stacks_on` is the same for one block)."""
    if not isinstance(on, StacksOn):
        raise TypeError(f"set_stacks takes a StacksOn, not {type(on).__name__}")
    for layer in stacked_layers(model):
        layer.on = on


@contextmanager
def stacks_on(model: nn.Module, on: StacksOn) -> Iterator[nn.Module]:
    """Inside the block, the stacks run as `on` says; afterwards every layer is back to what it was
    before, even if the block raised."""
    layers = list(stacked_layers(model))
    before = [layer.on for layer in layers]
    set_stacks(model, on)
    try:
        yield model
    finally:
        for layer, b in zip(layers, before):
            layer.on = b


def _in_out(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of nn.Linear, our NF4Linear and bitsandbytes' Linear4bit alike."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    raise TypeError(f"cannot tell the input/output sizes of {type(module).__name__}: it needs in_features/out_features")


class StackedLinear(nn.Module):
    """base(x) + weighted frozen stacks + active stack, for one projection."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = _in_out(base_layer)
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.stacks = nn.ModuleDict()  # domain -> ModuleList of frozen adapters, in training order
        self.active: nn.Module | None = None
        self.on = StacksOn.ungated()  # which frozen stacks run, with which weight (set by stacks_on)
        self.use_fused = True  # fused multi-stack inference (the loop is the reference)
        # null-space projection of the active stack (nullspace.Projection): an object whose
        # `basis(training)` gives V [d_out, K] or None; the adapter then writes nothing into V
        self.project_active = None
        self.last_aux: torch.Tensor | None = None
        self._fused: FusedStacks | None = None

    # -- which frozen stacks run, with which weight -------------------------------------------------
    def weight_of(self, domain: str) -> float:
        return self.on.weight_of(domain)

    def live_domains(self) -> list[str]:
        """Domains whose frozen stacks contribute (weight above the skip threshold)."""
        return [d for d in self.stacks if self.weight_of(d) > SKIP_THRESHOLD]

    def frozen_delta_loop(self, x: torch.Tensor) -> torch.Tensor | None:
        """Σ_d w_d Σ_j Δ_j(x), stack by stack: the obvious reference for the fused path."""
        total = None
        for domain in self.live_domains():
            w = self.weight_of(domain)
            for adapter in self.stacks[domain]:
                d = adapter(x).delta * w
                total = d if total is None else total + d
        return total

    def frozen_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        live = self.live_domains()
        if not live:
            return None
        # fused only where it is exact: frozen stacks in eval mode (train-mode ones route noisily)
        if self.use_fused and not any(a.training for d in live for a in self.stacks[d]):
            key = tuple((d, len(self.stacks[d]), self.weight_of(d)) for d in live)
            if self._fused is None or self._fused.key != key:
                self._fused = FusedStacks(self, live, key)
            return self._fused(x)
        return self.frozen_delta_loop(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        self.last_aux = None
        if self.on.base:
            return y
        # no torch.no_grad() here: the frozen weights need no gradient (requires_grad is False), but the
        # frozen deltas depend on x, and earlier layers' active stacks need the gradient through them
        frozen = self.frozen_delta(x) if len(self.stacks) else None
        if frozen is not None:
            y = y + frozen
        if self.active is not None:
            V = self.project_active.basis(self.training) if self.project_active is not None else None
            # projecting B (not every token's delta) gives the same delta and gradients, far cheaper
            out = self.active(x) if V is None else self.active(x, out_basis=V)
            y = y + out.delta
            self.last_aux = out.aux_loss
        return y

    def invalidate(self) -> None:
        self._fused = None

    def train(self, mode: bool = True) -> StackedLinear:
        """model.train(mode) reaches every layer through here: the active stack follows `mode`, the base and
        the frozen stacks stay in eval mode (no routing noise) unless frozen with keep_train_mode."""
        self.training = mode
        self.base_layer.eval()
        if self.active is not None:
            self.active.train(mode)
        for stack in self.stacks.values():
            for adapter in stack:
                adapter.train(mode and getattr(adapter, "_keep_train_mode", False))
        return self

    def extra_repr(self) -> str:
        n = {d: len(s) for d, s in self.stacks.items()}
        return f"in={self.in_features}, out={self.out_features}, frozen={n}, active={self.active is not None}"


class FusedStacks:
    """All live frozen stacks of one projection in a single pass (inference only).

    For S adapters with E_s experts of rank r_s (a LoRA is one expert whose gate is 1):

        [h | z] = x @ [A_1; …; A_S; R_1; …; R_S]ᵀ        one matmul      [T, Σ E_s·r_s + Σ E_s]
                                                        (expert activations h, router logits z)
        g_s = softmax(top-k of z_s), 0 elsewhere        per run         [T, S, E]
        Δ = (h ⊙ g, each gate over its expert's r columns) @ [w_1·s_1·B_1 … w_S·s_S·B_S]ᵀ    one matmul

    The gates depend on x, so they cannot be folded into B once and for all; the domain weights w and
    rsLoRA scales s can, and are: they scale each adapter's columns of B when the pass is built, so a
    token pays only for its gates. Consecutive adapters with the same routing spec form one run, gated
    with one top-k over [T, S, E]; a gate multiplies its expert's r activations by broadcasting over a
    [T, S, E, r] view, so no per-token copy of the gates is made. Generation runs this once per token per
    projection, and every op saved here is saved 7 times per layer per token.
    """

    def __init__(self, layer: StackedLinear, live: list[str], key: tuple):
        self.key = key
        As, Rs, Bs, specs = [], [], [], []  # the routing spec of each adapter, in order
        for domain in live:
            w = layer.weight_of(domain)
            for adapter in layer.stacks[domain]:
                if isinstance(adapter, MoELoRA):
                    E, r = adapter.n_experts, adapter.r
                    As.append(adapter.lora_A.reshape(E * r, -1))  # [E·r, d_in]
                    B = adapter.lora_B.permute(1, 0, 2).reshape(adapter.lora_B.shape[1], E * r)  # [d_out, E·r]
                    Bs.append(B * (w * adapter.scaling))
                    Rs.append(adapter.router.weight)  # [E, d_in]
                    specs.append((E, r, adapter.top_k, adapter.routing, adapter.top_p))
                elif isinstance(adapter, LoRA):
                    As.append(adapter.lora_A)
                    Bs.append(adapter.lora_B * (w * adapter.scaling))
                    specs.append((1, adapter.r, 1, "lora", 1.0))
                else:
                    raise TypeError(f"cannot fuse a {type(adapter).__name__}")
        self.runs: list[list] = []  # [spec, S]: S consecutive adapters with the same spec
        for spec in specs:
            if self.runs and self.runs[-1][0] == spec:
                self.runs[-1][1] += 1
            else:
                self.runs.append([spec, 1])
        with torch.no_grad():
            # the experts' A rows and the routers' rows in one matrix: one matmul gives both (as in MoELoRA)
            self.AR = torch.cat(As + Rs).detach()  # [Σ E·r + Σ_moe E, d_in]
            self.C = sum(a.shape[0] for a in As)  # Σ E·r
            self.B = torch.cat(Bs, dim=1).detach()  # [d_out, Σ E·r], each adapter's columns scaled by w·s

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # [T, F]
        # T tokens, F d_in, C = Σ E·r columns, O d_out, S stacks in a run, E experts, r rank
        hz = F.linear(x, self.AR)  # [T, C + Σ_moe E]
        h, z = hz[:, : self.C], hz[:, self.C :]  # expert activations [T, C], router logits [T, Σ_moe E]
        parts, hi, zi = [], 0, 0
        for (E, r, k, routing, top_p), S in self.runs:
            width = S * E * r
            hs = h[:, hi : hi + width]
            hi += width
            if routing == "lora":  # a LoRA's gate is 1: its columns pass as they are
                parts.append(hs)
                continue
            zs = z[:, zi : zi + S * E].view(-1, S, E)
            zi += S * E
            if routing == "top_k":
                # softmax over the k kept logits, zero elsewhere: route()'s gates in three ops
                kept, idx = zs.topk(k, dim=-1)
                g = torch.zeros_like(zs).scatter(-1, idx, kept.softmax(dim=-1))  # [T, S, E]
            else:
                g = route(zs, routing, k, top_p)[0]  # [T, S, E]
            parts.append((hs.view(-1, S, E, r) * g.unsqueeze(-1)).view(-1, width))  # [T, S·E·r]
        gated = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return F.linear(gated, self.B).view(*lead, -1)  # [..., O]


# -- whole-model operations ------------------------------------------------------------------------


def inject_stacks(model: nn.Module, target_modules: tuple[str, ...] = TARGET_MODULES) -> list[StackedLinear]:
    """Freeze the whole model and wrap every module named one of `target_modules` with a StackedLinear (in place).

    Everything that exists before injection is the base: embeddings and norms are frozen too."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [(name, mod) for name, mod in model.named_modules()
               if name.split(".")[-1] in target_modules and not isinstance(mod, StackedLinear)]
    if not targets and not list(stacked_layers(model)):
        raise ValueError(f"no module of the model is named one of {target_modules}")
    for name, mod in targets:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.split(".")[-1], StackedLinear(mod))
    return list(stacked_layers(model))


def stacked_layers(model: nn.Module) -> Iterator[StackedLinear]:
    return (m for m in model.modules() if isinstance(m, StackedLinear))


def add_stack(model: nn.Module, make_adapter: Callable[[int, int], nn.Module]) -> list[nn.Parameter]:
    """Give every stacked layer a fresh active adapter `make_adapter(d_in, d_out)`; return its parameters."""
    params = []
    for layer in stacked_layers(model):
        if layer.active is not None:
            raise RuntimeError("a stack is already active: freeze it (or drop it) before adding another")
        ref = next(layer.base_layer.buffers(), None)
        ref = next(layer.base_layer.parameters(), ref)
        layer.active = make_adapter(layer.in_features, layer.out_features).to(ref.device if ref is not None else "cpu")
        layer.active.train()
        params += list(layer.active.parameters())
    return params


def active_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The only parameters an optimizer is ever given."""
    return [p for layer in stacked_layers(model) if layer.active is not None for p in layer.active.parameters()]


def freeze_active(model: nn.Module, domain: str, keep_train_mode: bool = False) -> None:
    """Move the active adapter of every layer into the frozen stacks of `domain`."""
    for layer in stacked_layers(model):
        if layer.active is None:
            raise RuntimeError("no active stack to freeze")
        adapter = layer.active
        for p in adapter.parameters():
            p.requires_grad_(False)
        adapter.train(keep_train_mode)
        adapter._keep_train_mode = keep_train_mode  # survives model.train()/eval() calls, see below
        if domain not in layer.stacks:
            layer.stacks[domain] = nn.ModuleList()
        layer.stacks[domain].append(adapter)
        layer.active = None
        layer.invalidate()


def drop_active(model: nn.Module) -> None:
    for layer in stacked_layers(model):
        layer.active = None


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Σ over layers of the active adapters' load-balance losses from the last forward."""
    total = torch.zeros(())
    for layer in stacked_layers(model):
        if layer.last_aux is not None:
            total = total + layer.last_aux
    return total
