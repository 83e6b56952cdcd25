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
- Which frozen stacks run is one `StacksOn` (ungated, weighted, the base alone, or one of those per batch
  row; stacks/selection.py); a domain at or below `SKIP_THRESHOLD` (0.12, docs/brainstacks.md §6) is
  skipped entirely — no compute at all.
- Inference over many frozen stacks runs as one fused pass (`FusedStacks`, stacks/fused.py), checked against
  the stack-by-stack loop in the tests; projections that read the same input (q, k, v; gate, up) share one
  pass where the model asks for it (`StackedLinear.joint_forward`).

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

from ..adapters.lora import LoRA
from ..adapters.moe_lora import MoELoRA
from ..lm.model import PROJECTION_NAMES
from .fused import FusedStacks
from .selection import StacksOn

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
        # the fused passes (fused.py) and what each was built for: this layer alone, and this layer first in a
        # group that reads one input (q, k, v; gate, up: `joint_forward`). None as a pass: the loop runs
        self._fused: FusedStacks | None = None
        self._fused_key: tuple | None = None
        self._joint: FusedStacks | None = None
        self._joint_key: tuple | None = None
        self._version = 0  # counts invalidate() calls: a pass built before one is rebuilt, a group's too

    # -- which frozen stacks run, with which weight -------------------------------------------------
    def weight_of(self, domain: str) -> float:
        return self.on.weight_of(domain)

    def live_domains(self) -> list[str]:
        """Domains whose frozen stacks contribute (weight above the skip threshold, in some row)."""
        return self.on.live(self.stacks)

    def _weight(self, domain: str, x: torch.Tensor) -> float | torch.Tensor:
        """w_d, or per row (StacksOn.per_row) a [B, 1, ..., 1] tensor that scales row b of x's delta."""
        if self.on.rows is None:
            return self.weight_of(domain)
        w = self.on.row_weights(domain)
        if x.dim() < 2 or x.shape[0] != len(w):
            raise ValueError(f"per-row stack weights for {len(w)} rows, but the input's shape is {tuple(x.shape)}")
        return torch.tensor(w, dtype=x.dtype, device=x.device).view(-1, *[1] * (x.dim() - 1))

    def frozen_delta_loop(self, x: torch.Tensor) -> torch.Tensor | None:
        """Σ_d w_d Σ_j Δ_j(x), stack by stack: the obvious reference for the fused path."""
        total = None
        for domain in self.live_domains():
            w = self._weight(domain, x)
            for adapter in self.stacks[domain]:
                d = adapter(x).delta * w
                total = d if total is None else total + d
        return total

    def frozen_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """The same sum through the fused pass where it runs (None: no live stack)."""
        fused = self.fused_pass() if self.use_fused else None
        return self.frozen_delta_loop(x) if fused is None else fused(x, with_base=False)[0]

    # -- the fused pass (inference) -------------------------------------------------------------------
    def pass_key(self) -> tuple:
        """What a fused pass of this layer is built from, bar the stacks themselves: the weights, and
        `_version`, which invalidate() bumps (freeze_active calls it; so must code that edits a frozen stack
        by hand). Compared on every call, so it is two attributes, not a walk over the stacks."""
        return self.on, self._version

    def fused_pass(self) -> FusedStacks | None:
        """This layer's fused pass, built on first use and again when `pass_key` changes; None where the
        loop must run."""
        key = self.pass_key()
        if self._fused_key != key:
            self._fused, self._fused_key = _fused_or_none([self], key), key
        return self._fused

    def joint_forward(self, x: torch.Tensor, layers: tuple[nn.Module, ...]) -> list[torch.Tensor] | None:
        """[layer(x) for layer in layers] (this layer first; all read x) as one fused pass, or None where each
        must run as its own module. The model calls it for q/k/v and gate/up (lm/model.py's `project`).

        Inference only: with an active stack (training), with the base alone, or with a hook on a layer
        (nullspace.collect_deltas records every layer's input through one) the layers run one by one."""
        for layer in layers:  # the base alone first: it is the cheapest check, and the base path pays for it
            if (not isinstance(layer, StackedLinear) or layer.on.base or not layer.use_fused
                    or layer.active is not None or _hooked(layer)):
                return None
        key = (layers, tuple(layer.pass_key() for layer in layers))
        if self._joint_key != key:
            self._joint, self._joint_key = _fused_or_none(layers, key), key
        if self._joint is None:
            return None
        for layer in layers:
            if layer.last_aux is not None:  # as in forward
                layer.last_aux = None
        return self._joint(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.last_aux is not None:  # nn.Module's __setattr__ costs a few µs, paid per token per layer
            self.last_aux = None
        if self.on.base:
            return self.base_layer(x)
        if x.dtype != torch.float32:
            return self._forward_in_fp32(x)
        # no torch.no_grad() here: the frozen weights need no gradient (requires_grad is False), but the
        # frozen deltas depend on x, and earlier layers' active stacks need the gradient through them
        fused = self.fused_pass() if self.use_fused else None
        if fused is not None:
            y = fused(x)[0]  # base + frozen stacks
        else:
            y = self.base_layer(x)
            frozen = self.frozen_delta_loop(x) if len(self.stacks) else None
            if frozen is not None:
                y = y + frozen
        return y if self.active is None else self._plus_active(x, y)

    def _plus_active(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + the active stack's delta of x (in y's dtype), its load-balance loss kept in `last_aux`."""
        V = self.project_active.basis(self.training) if self.project_active is not None else None
        # projecting B (not every token's delta) gives the same delta and gradients, far cheaper
        out = self.active(x) if V is None else self.active(x, out_basis=V)
        self.last_aux = out.aux_loss
        return y + out.delta.to(y.dtype)

    def _forward_in_fp32(self, x: torch.Tensor) -> torch.Tensor:
        """A base that computes in bf16 (a 4-bit base on a GPU): the stacks, whose parameters are fp32, read x in
        fp32 and add their delta back in the base's dtype (QLoRA's mixed precision), stack by stack."""
        y = self.base_layer(x)
        x32 = x.float()
        frozen = self.frozen_delta_loop(x32) if len(self.stacks) else None
        if frozen is not None:
            y = y + frozen.to(y.dtype)
        return y if self.active is None else self._plus_active(x32, y)

    def invalidate(self) -> None:
        """Drop the fused passes: call it after changing the frozen stacks by hand (adding or deleting one,
        editing its parameters in place, switching its train/eval mode); freeze_active and train() call it
        themselves."""
        self._version += 1
        self._fused = self._joint = self._fused_key = self._joint_key = None

    def train(self, mode: bool = True) -> StackedLinear:
        """model.train(mode) reaches every layer through here: the active stack follows `mode`, the base and
        the frozen stacks stay in eval mode (no routing noise) unless frozen with keep_train_mode."""
        self.training = mode
        self.base_layer.eval()
        if self.active is not None:
            self.active.train(mode)
        changed = False
        for stack in self.stacks.values():
            for adapter in stack:
                frozen_mode = mode and getattr(adapter, "_keep_train_mode", False)
                changed |= adapter.training != frozen_mode
                adapter.train(frozen_mode)
        if changed:  # a noisy frozen stack has no fused pass, a quiet one needs one
            self.invalidate()
        return self

    def extra_repr(self) -> str:
        n = {d: len(s) for d, s in self.stacks.items()}
        return f"in={self.in_features}, out={self.out_features}, frozen={n}, active={self.active is not None}"


def _hooked(module: nn.Module) -> bool:
    """Whether calling `module` runs hooks, which a joint pass (that calls no layer as a module) would skip."""
    g = nn.modules.module
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or g._global_forward_hooks or g._global_forward_pre_hooks
                or g._global_backward_hooks or g._global_backward_pre_hooks)


def _fused_or_none(layers, key: tuple) -> FusedStacks | None:
    """The fused pass of `layers`, or None where the loop must run: no live frozen stack, or one in train
    mode (frozen with keep_train_mode, it routes noisily, and only the loop draws the noise)."""
    adapters = [a for layer in layers for d in layer.live_domains() for a in layer.stacks[d]]
    if not adapters or any(a.training for a in adapters):
        return None
    return FusedStacks(layers, key)


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
    """Every StackedLinear of `model`, in `modules()` order, each once (a module reachable twice is yielded
    once, as `modules()` does). The walk does not go inside one: a stacked layer holds no other, and its
    adapters are most of a stacked model's modules (every call of stacks_on and set_stacks walks the model,
    tens of thousands of times in a demo)."""
    seen: set[int] = set()

    def walk(module: nn.Module) -> Iterator[StackedLinear]:
        if id(module) in seen:
            return
        seen.add(id(module))
        if isinstance(module, StackedLinear):
            yield module
            return
        for child in module.children():
            yield from walk(child)

    return walk(model)


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


def thaw_last(model: nn.Module, domain: str) -> list[nn.Parameter]:
    """The inverse of `freeze_active`: the last frozen stack of `domain` becomes every layer's active stack
    again, trainable (RL on a finished run's last-trained domain). Returns its parameters."""
    for layer in stacked_layers(model):
        if layer.active is not None:
            raise RuntimeError("a stack is already active: freeze it (or drop it) before thawing another")
        if domain not in layer.stacks:
            raise ValueError(f"no frozen stack of {domain!r} to thaw")
        adapter = layer.stacks[domain][-1]
        del layer.stacks[domain][-1]
        if not len(layer.stacks[domain]):
            del layer.stacks[domain]
        for p in adapter.parameters():
            p.requires_grad_(True)
        layer.active = adapter
        layer.invalidate()
    return active_parameters(model)


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
