"""What do the stacks and the meta-router cost at inference, against the base alone?

Brainstacks answers a prompt with the frozen base plus the frozen stacks of the domains the meta-router
switches on (docs/brainstacks.md §6). Every projection then computes base(x) + Σ_d w_d Σ_j Δ_j(x), so a stack costs a
few thin matmuls per projection, and routing costs a pass of the prompt through the base (the router's
features) plus the router network, but lets every switched-off domain cost nothing. `bench_route`
times, on one model carrying the stacks of a 5-domain × 2-round run (10 frozen MoE-LoRA stacks at the
paper's proportions — 4 experts, top-2, the rank that makes one stack ~4.9% of the base, as the presets
train them; `literal=True` puts the paper's literal 4 × r16 on instead — on all 7 projections of every
layer, B random so that they do real work):

  base    the base alone (`StacksOn.base_only()`)
  fused   every stack on at weight 1 (ungated) through the fused pass (`FusedStacks`, stacks/fused.py): one
          pass for all the stacks of the projections that read one input (q/k/v, gate/up; o and down alone)
  loop    the same, stack by stack (`use_fused = False`, the reference path)
  routed  what a routed answer costs:

              raw prompt ──► base, stacks off (prompt_features) ──► MetaRouter ──► p_d       "router"
              prompt ──► base + stacks of the routed domains ──► logits                       "stacks"

          An untrained router gives arbitrary probabilities, so the stacked pass uses a fixed typical
          route instead of its output: chat at its floor 0.2 and one domain at 0.9 (`ROUTE`). That is
          2 domains × 2 rounds = 4 live stacks; the other 6 fall under the skip threshold and cost
          nothing. The router's probabilities are computed and dropped, and every prompt of the batch
          takes the same route (a server would group prompts by route). Each new prompt brings new
          weights, which rebuild the fused matrices of the live stacks, so the routed pass rebuilds
          them every time (it is part of "stacks").

Two measurements, since they answer different questions:
  forward     one pass over a batch of prompts (batch_size × seq_len tokens). The feature pass is a
              base forward over the same prompt, so here routed costs at least ~2× base by
              construction, however cheap the stacks are.
  generate    batch 1: the prompt, then n_new greedy tokens with the KV cache; routed = feature pass +
              router once for the prompt, then the generation with the routed weights. This is what a
              user waits for: the router's one pass is spread over every generated token. It is still a
              pass over the whole prompt, about what the base's own prefill costs: with the defaults' 128
              prompt tokens and 32 new ones, a sixth to a fifth of the base's time on 1 thread, which
              the stacks' cost comes on top of.
The target is routed ≤ 1.3× base; the report says for each measurement whether it is met.

The cost of a stack is relative to the width of the model: a MoE-LoRA stack adds n_experts·r columns
to every projection — 64 for the literal 4 × r16, a quarter of the quick preset's d_model 256 but 3% of
TinyLlama's 2048 (the paper's base). Two models are measured by default: the quick preset's (4 layers,
d 256) and a wider one (2 layers, d 1024), each with the stacks its proportions give it.

Everything runs under torch.no_grad() in fp32 and eval mode. The variants run interleaved (base,
fused, loop, routed, base, ...) so that another process taking the cores slows them alike; medians
are reported, with the same ratios from each variant's fastest run and the spread between the two.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Sequence

import torch

from ..data.example import DOMAINS
from ..lm.model import ModelConfig, Transformer
from ..presets import QUICK
from ..routing.router import MetaRouter, RouterConfig, prompt_features
from ..runtime import keep_freed_memory
from ..stacks.proportions import scaled_adapter, stack_share
from ..stacks.layer import (
    AdapterConfig,
    StacksOn,
    add_stack,
    freeze_active,
    inject_stacks,
    make_adapter,
    set_stacks,
    stacked_layers,
    stacks_on,
)
from .timing import Timings, busy_machine, load_average, median, time_interleaved

ROUTE = {"chat": 0.2, "math": 0.9}  # a typical route: chat at its floor (RouterConfig.chat_floor), one domain on
ROUNDS_PER_DOMAIN = 2  # stacks per domain, as after 2 rounds of residual boosting
TARGET = 1.3  # routed / base at most this
FORWARD = ("base", "fused", "loop", "routed")
GENERATE = ("base", "fused", "routed")
ROUTED_PARTS = ("features", "router", "stacks")
ADAPTER = AdapterConfig()  # the paper's literal MoE-LoRA: 4 experts x rank 16, top-2 (`literal=True`)


def adapter_for(cfg: ModelConfig, literal: bool = False) -> AdapterConfig:
    """The stacks the benchmark puts on `cfg`: the paper's proportions (stacks/proportions.py: 4 experts,
    top-2, the rank whose stack is nearest 4.9% of the base), as the presets train them; or the literal
    4 x r16 with `literal`."""
    return ADAPTER if literal else scaled_adapter(cfg)


def default_configs() -> dict[str, ModelConfig]:
    """The quick preset's model, and a wider, shallower one closer to the paper's stack/width ratio."""
    return {
        "quick": dataclasses.replace(QUICK.model, vocab_size=4096),
        "wide": ModelConfig(vocab_size=4096, n_layer=2, d_model=1024, n_head=8, n_kv_head=4, max_seq_len=256),
    }


# -- the benchmark's model and its four paths ---------------------------------------------------------


class PretokenizedPrompts:
    """The tokenizer `prompt_features` is given when the prompts already are token ids: `encode` hands them
    through. The benchmark's prompts are random ids; encoding text is not what it measures."""

    pad_id = 0

    def encode(self, ids: Sequence[int], bos: bool = False) -> list[int]:
        return list(ids)


def stacked_model(cfg: ModelConfig, domains: Sequence[str] = DOMAINS, rounds: int = ROUNDS_PER_DOMAIN,
                  adapter: AdapterConfig = ADAPTER, seed: int = 0) -> Transformer:
    """A random base carrying `rounds` frozen MoE-LoRA stacks per domain, ungated, in eval mode."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    inject_stacks(model)
    for domain in domains:
        for _ in range(rounds):
            add_stack(model, make_adapter("moe", adapter))
            # B starts at zero (a fresh stack is the identity); a trained one is not, and only a nonzero
            # B makes the fused and stack-by-stack paths do work worth comparing
            with torch.no_grad():
                for layer in stacked_layers(model):
                    layer.active.lora_B.normal_(std=cfg.init_std)
            freeze_active(model, domain)
    set_stacks(model, StacksOn.ungated())
    return model.eval()


def base_forward(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with stacks_on(model, StacksOn.base_only()):
        return model(ids).logits


def loop_forward(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """The forward with every stack evaluated one by one (the fused path's reference)."""
    layers = list(stacked_layers(model))
    was = [layer.use_fused for layer in layers]
    for layer in layers:
        layer.use_fused = False
    try:
        return model(ids).logits
    finally:
        for layer, flag in zip(layers, was):
            layer.use_fused = flag


def route_prompts(model: Transformer, router: MetaRouter, ids: torch.Tensor,
                  route: dict[str, float]) -> dict[str, float]:
    """Feature pass + router network for the prompts `ids` [B, T], then switch the model to `route`.

    Returns the seconds of each part. The router's probabilities are what a trained router would turn
    into weights (`routing_weights`); an untrained one's are arbitrary, so `route` is used instead."""
    t0 = time.perf_counter()
    feats, mask = prompt_features(model, PretokenizedPrompts(), ids.tolist(), router.cfg)
    t1 = time.perf_counter()
    router.probabilities(feats, mask)  # [B, D], dropped
    t2 = time.perf_counter()
    set_stacks(model, StacksOn.weighted(route))
    for layer in stacked_layers(model):
        # a new prompt's weights differ from the last one's, so its fused matrices are built afresh
        layer.invalidate()
    return {"features": t1 - t0, "router": t2 - t1}


def routed_forward(model: Transformer, router: MetaRouter, ids: torch.Tensor,
                   route: dict[str, float] = ROUTE) -> tuple[torch.Tensor, dict[str, float]]:
    """Route the prompts, then the forward with the routed weights: (logits, seconds per part)."""
    parts = route_prompts(model, router, ids, route)
    t0 = time.perf_counter()
    logits = model(ids).logits
    parts["stacks"] = time.perf_counter() - t0
    return logits, parts


def routed_generate(model: Transformer, router: MetaRouter, prompt: torch.Tensor, n_new: int,
                    route: dict[str, float] = ROUTE) -> tuple[torch.Tensor, dict[str, float]]:
    """Route the prompt [1, T] once, then generate n_new greedy tokens with the routed weights."""
    parts = route_prompts(model, router, prompt, route)
    t0 = time.perf_counter()
    seq = model.generate(prompt, n_new)
    parts["stacks"] = time.perf_counter() - t0
    return seq, parts


def base_generate(model: Transformer, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    with stacks_on(model, StacksOn.base_only()):
        return model.generate(prompt, n_new)


# -- timing ----------------------------------------------------------------------------------------------


def _summary(timed: Timings, parts: list[dict[str, float]], ratio_names: Sequence[str]) -> dict:
    med, best = timed.median, timed.fastest

    def ratios(t: dict) -> dict:
        return {name: t[name.split("/")[0]] / t[name.split("/")[1]] for name in ratio_names}

    routed = timed.seconds["routed"]
    part_med = {p: median([x[p] for x in parts]) for p in ROUTED_PARTS}
    # the router's own share of routed time (feature pass + router network), per run, then the median
    share = {p: median([x[p] / t for x, t in zip(parts, routed)]) for p in ("features", "router")}
    share["total"] = median([(x["features"] + x["router"]) / t for x, t in zip(parts, routed)])
    r = ratios(med)
    return {
        "seconds": med, "ratios": r,
        # the same ratios from each variant's fastest run: on an idle machine they agree with the medians
        "best_seconds": best, "best_ratios": ratios(best),
        "spread": timed.spread,  # median / fastest run, 1.0 = perfectly steady
        "routed_parts": part_med, "router_share": share,
        "target_met": r["routed/base"] <= TARGET,
    }


@torch.no_grad()
def _bench_one(cfg: ModelConfig, batch_size: int, seq_len: int, n_new: int, rounds: int, budget_s: float,
               seed: int, adapter: AdapterConfig) -> dict:
    if seq_len + n_new > cfg.max_seq_len:
        cfg = dataclasses.replace(cfg, max_seq_len=seq_len + n_new)
    model = stacked_model(cfg, seed=seed, adapter=adapter)
    routed_model = copy.deepcopy(model)  # its own fused cache: switching weights must not rebuild the ungated one's
    router = MetaRouter(cfg.d_model, DOMAINS, RouterConfig()).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    prompt = ids[:1]

    # the routed variants return their parts' seconds (kept), the others nothing (their logits are dropped)
    forward = {
        "base": lambda: base_forward(model, ids),
        "fused": lambda: model(ids).logits,
        "loop": lambda: loop_forward(model, ids),
        "routed": lambda: routed_forward(routed_model, router, ids)[1],
    }
    generate = {
        "base": lambda: base_generate(model, prompt, n_new),
        "fused": lambda: model.generate(prompt, n_new),
        "routed": lambda: routed_generate(routed_model, router, prompt, n_new)[1],
    }
    fns = {f"{kind}/{k}": fn for kind, fs in (("forward", forward), ("generate", generate)) for k, fn in fs.items()}
    # interleaved: base, fused, loop, routed forwards, then base, fused, routed generations, base, ...;
    # one untimed warm-up round: first allocations, the fused matrices
    timed = time_interleaved(fns, rounds=rounds, warmup=1, budget_s=budget_s,
                             keep=("forward/routed", "generate/routed"))

    def of(kind: str, names: Sequence[str]) -> Timings:
        return Timings({k: timed.seconds[f"{kind}/{k}"] for k in names}, {})

    return {
        "forward": _summary(of("forward", FORWARD), timed.results["forward/routed"],
                            ("fused/base", "loop/base", "loop/fused", "routed/base")),
        "generate": _summary(of("generate", GENERATE), timed.results["generate/routed"], ("fused/base", "routed/base")),
        "rounds": timed.rounds,
        # columns a MoE-LoRA stack adds to a projection, relative to the model's width
        "stack_width": adapter.n_experts * adapter.r / cfg.d_model,
        "adapter": dataclasses.asdict(adapter), "stack_share": stack_share(cfg, adapter),
        "config": cfg.to_dict(), "ff_dim": cfg.ff_dim,
    }


def bench_route(configs: dict[str, ModelConfig] | None = None, batch_size: int = 8, seq_len: int = 128,
                n_new: int = 32, rounds: int = 5, time_budget_s: float = 60.0, seed: int = 0,
                literal: bool = False) -> dict:
    """Median seconds of base / fused / loop / routed forwards and base / fused / routed generations, per model.

    For each config, up to `rounds` interleaved rounds are timed after an untimed warm-up round; once the
    config's share of `time_budget_s` has passed (counting the warm-up), timing stops, keeping at least
    3 rounds (fewer only if `rounds` asks for fewer). About a minute in all on 2 idle cores with the
    defaults, longer on a busy machine. Returns, per config, `forward` and `generate` with the median `seconds`,
    `ratios` (vs base), `best_ratios`, `spread`, the routed run's `routed_parts` and `router_share`, and
    `target_met` (routed/base ≤ 1.3); and the settings."""
    keep_freed_memory()
    # other processes' demand for the cores, before ours starts. A steady load slows every run alike, so
    # the spread does not show it, but it stalls the many small ops of the stacks more than the base's
    # large matmuls (each op waits for its threads to be scheduled), and so inflates the ratios
    load = load_average()
    configs = configs or default_configs()
    results = {name: _bench_one(cfg, batch_size, seq_len, n_new, rounds, time_budget_s / len(configs), seed,
                                adapter_for(cfg, literal))
               for name, cfg in configs.items()}
    return {
        "configs": results, "route": dict(ROUTE), "target": TARGET,
        "domains": list(DOMAINS), "rounds_per_domain": ROUNDS_PER_DOMAIN,
        "stacks": len(DOMAINS) * ROUNDS_PER_DOMAIN, "live_stacks": len(ROUTE) * ROUNDS_PER_DOMAIN,
        "adapter": "literal" if literal else "scaled",  # each config's own is in its entry
        "batch_size": batch_size, "seq_len": seq_len, "n_new": n_new, "threads": torch.get_num_threads(),
        "cores": os.cpu_count(), "load_before": load,
    }


# -- report ---------------------------------------------------------------------------------------------


def _verdict(ratio: float, target: float) -> str:
    return f"{'met' if ratio <= target else 'NOT met'} ({ratio:.2f}x)"


def format_bench_route(d: dict) -> str:
    target = d["target"]
    route = ", ".join(f"{k} {v:g}" for k, v in d["route"].items())
    shape = ("the paper's literal 4 experts x r16" if d["adapter"] == "literal" else
             "at the paper's proportions (4 experts, top-2, the rank that makes a stack ~4.9% of the base)")
    lines = [
        (f"Inference cost of stacks and routing (fp32, no grad): {d['stacks']} frozen MoE-LoRA stacks "
         f"({len(d['domains'])} domains x {d['rounds_per_domain']} rounds), {shape}, on all 7 projections"),
        (f"  routed = feature pass (base alone over the prompt) + meta-router + stacked pass with the fixed "
         f"route {route}: {d['live_stacks']} stacks live, the others skipped"),
        (f"  forward: {d['batch_size']} x {d['seq_len']} tokens; generate: batch 1, the {d['seq_len']}-token "
         f"prompt + {d['n_new']} greedy tokens (KV cache); {d['threads']} threads, medians"),
    ]
    names = {"base": "base alone",
             "fused": f"+ {d['stacks']} stacks, ungated, fused",
             "loop": f"+ {d['stacks']} stacks, ungated, stack by stack",
             "routed": f"routed ({d['live_stacks']} stacks live)"}
    spreads = []
    for name, r in d["configs"].items():
        c, a = r["config"], r["adapter"]
        lines += ["", (f"{name}: {c['n_layer']} layers, d_model {c['d_model']}, ff {r['ff_dim']}, "
                       f"vocab {c['vocab_size']}; stacks {a['n_experts']} x r{a['r']} top-{a['top_k']}, one is "
                       f"{r['stack_share']:.1%} of the base and adds {a['n_experts'] * a['r']} columns per "
                       f"projection ({r['stack_width']:.0%} of d_model); {r['rounds']} rounds")]
        for kind in ("forward", "generate"):
            m = r[kind]
            s, p = m["seconds"], m["routed_parts"]
            tokens = d["batch_size"] * d["seq_len"] if kind == "forward" else d["n_new"]
            unit = "tok/s" if kind == "forward" else "new tok/s"
            for k, t in s.items():
                row = f"  {kind if k == 'base' else '':<9} {names[k]:<36} {t * 1e3:8.1f} ms {tokens / t:8,.0f} {unit}"
                if k == "routed":
                    row += (f"  = features {p['features'] * 1e3:.1f} + router {p['router'] * 1e3:.1f} "
                            f"+ stacked {p['stacks'] * 1e3:.1f} ms")
                lines.append(row)
            q, b, share = m["ratios"], m["best_ratios"], m["router_share"]
            lines += [
                "            ratios  " + "   ".join(f"{k} {v:.2f}" for k, v in q.items()),
                "            (best)  " + "   ".join(f"{k} {v:.2f}" for k, v in b.items()),
                (f"            router's share of routed time {share['total']:.0%} (feature pass "
                 f"{share['features']:.0%}, router network {share['router']:.0%})"),
            ]
            spreads += m["spread"].values()
        f, g = r["forward"]["ratios"]["routed/base"], r["generate"]["ratios"]["routed/base"]
        # what routing costs before any stack does: the feature pass and the router network, on top of a
        # stacked pass that would cost exactly the base's if the stacks were free
        gen = r["generate"]
        floor = 1 + (gen["routed_parts"]["features"] + gen["routed_parts"]["router"]) / gen["seconds"]["base"]
        stacked = gen["routed_parts"]["stacks"] / gen["seconds"]["base"]
        lines.append(f"  target routed <= {target}x base: forward {_verdict(f, target)} (at least ~2x by "
                     f"construction: the feature pass is a base forward); generate {_verdict(g, target)}: "
                     f"with free stacks it would be {floor:.2f}x (feature pass + router), and the stacked "
                     f"generation alone is {stacked:.2f}x the base's")
    busy = busy_machine(spreads, d["load_before"])
    if busy.spread:
        lines.append(f"warning: median runs up to {busy.spread:.2f}x the fastest: the cores were busy with other work, "
                     f"so these ratios are unreliable; rerun on an idle machine")
    if busy.load:
        lines.append(f"warning: the load average was {busy.load:.1f} on {d['cores']} cores before the run: "
                     f"other processes were using the cores, which slows the stacks' many small ops more than "
                     f"the base's large ones, so the ratios overstate the stacks' cost; rerun on an idle machine")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_bench_route(bench_route()))
