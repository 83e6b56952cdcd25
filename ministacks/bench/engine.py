"""The disk-offloaded engine over a stream of prompts: what loading stacks on demand costs.

The engine (inference/offload.py, docs/brainstacks.md §7) keeps the base and the router in memory
and loads each prompt's domains from their safetensors files, dropping the least recently used domain
when the budget is full. Whether that is cheap depends on the stream: prompts of one domain in a row
hit the cache, a domain that comes back after the budget pushed it out is loaded again. `bench_engine`
answers a stream of prompts and measures, in one run:

  load        the time to read, check (sha256) and install one stack, over every miss
  hit rate    the share of the stream's domain requests found in memory
  router      the feature pass + router network per prompt, in ms
  tokens/s    greedy generation of `n_new` tokens per prompt, the base alone against the routed
              answer with everything it costs (router, the loads of its misses, the stacks' compute);
              each prompt is answered by both, one after the other, so a busy core slows both alike

The stream: `n_prompts` prompts, each of the previous prompt's domain with probability `stay` (a user
asks several questions of one kind), otherwise of a domain drawn uniformly from all five, seeded. The
budget holds the `budget_domains` largest domains' stacks (3 of 5 by default), so the stream evicts,
or the largest route of the stream if that needs more (a trained router may switch on every domain).

By default the run is built for the benchmark: the quick preset's model with random weights, 2 stacks
per domain at the presets' proportions (stacks/proportions.py) with random B, saved to a temporary
folder as training saves them, and an untrained router, whose cost is a trained one's. Its
probabilities would be arbitrary, so each prompt takes its own domain's route instead (the domain at
0.9 and chat at its floor 0.2; a chat prompt chat alone), and the prompts are random token ids of
`prompt_len`. With `run=` a trained run is used as it is: its test prompts, its router's routes.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..data.example import DOMAINS
from ..inference.offload import StackCache, live_domains
from ..inference.stacked import StackedRun
from ..lm.model import Transformer
from ..routing.router import MetaRouter
from ..stacks.layer import StacksOn, inject_stacks, stacks_on
from ..stacks.manifest import new_manifest, read_manifest, write_manifest
from ..stacks.proportions import scaled_adapter
from ..stacks.store import save_stack
from .route import ROUNDS_PER_DOMAIN, PretokenizedPrompts, default_configs, stacked_model
from .timing import busy_machine, load_average

ROUTE_WEIGHT, CHAT_FLOOR = 0.9, 0.2  # a synthetic prompt's route: its domain at 0.9, chat at its floor


class _Tokenizer(PretokenizedPrompts):
    def fingerprint(self) -> str:
        return "bench"


def synthetic_run(folder: Path, seed: int = 0) -> StackedRun:
    """bench route's model at the quick preset's size (random weights, 2 stacks per domain at the presets'
    proportions, random B), its stacks saved into `folder` as training saves them, and the same base
    again without them, whose stacks the engine loads from there: none in memory, every one on disk."""
    cfg = default_configs()["quick"]
    adapter = scaled_adapter(cfg)
    model = stacked_model(cfg, DOMAINS, ROUNDS_PER_DOMAIN, adapter, seed)
    tok = _Tokenizer()
    manifest = new_manifest(model, tok, list(DOMAINS), {"seed": seed})
    for domain in DOMAINS:
        for i in range(ROUNDS_PER_DOMAIN):
            save_stack(folder, model, domain, i + 1, "moe", adapter, meta={}, index=i)
            manifest["stacks"].append({"domain": domain, "round": i + 1})
    write_manifest(folder, manifest)
    torch.manual_seed(seed)  # stacked_model's base, drawn again (the engine checks its fingerprint)
    base = Transformer(cfg).eval()
    inject_stacks(base)
    router = MetaRouter(cfg.d_model, DOMAINS).eval()
    return StackedRun(base, tok, DOMAINS, router, where=str(folder),
                      cache=StackCache(folder, base, read_manifest(folder)))


def domain_stream(n: int, stay: float, seed: int, domains=DOMAINS) -> list[str]:
    """n domains: each the previous one with probability `stay`, else one drawn uniformly."""
    rng = random.Random(seed)
    stream = [rng.choice(domains)]
    while len(stream) < n:
        stream.append(stream[-1] if rng.random() < stay else rng.choice(domains))
    return stream


def synthetic_route(domain: str) -> dict[str, float]:
    return {"chat": 1.0} if domain == "chat" else {domain: ROUTE_WEIGHT, "chat": CHAT_FLOOR}


def bench_engine(run: str | None = None, n_prompts: int = 40, stay: float = 0.5, budget_domains: int = 3,
                 n_new: int = 16, prompt_len: int = 64, seed: int = 0) -> dict:
    load = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        if run is None:
            sr = synthetic_run(Path(tmp), seed)
            g = torch.Generator().manual_seed(seed)
            prompts = [torch.randint(1, 4096, (prompt_len,), generator=g).tolist() for _ in range(n_prompts)]
        else:
            from ..data import load_split
            from ..run import load_run

            sr = load_run(run, offload=True)
            tests = {d: load_split(d, "test", sr.preset.data) for d in sr.domains}
        stream = domain_stream(n_prompts, stay, seed, sr.cache.domains)
        if run is None:
            raws, ids_list = prompts, prompts
            routes = [synthetic_route(d) for d in stream]
        else:
            examples = [tests[d][i % len(tests[d])] for i, d in enumerate(stream)]
            raws = [ex.instruction for ex in examples]
            ids_list = [sr.tok.encode(ex.prompt(), bos=True)[-(sr.model.cfg.max_seq_len - n_new):] for ex in examples]
            routes = [sr.route(raw)["weights"] for raw in raws]  # known ahead, for the budget; timed again below
            sr.cache.stats.route_seconds.clear()
        # room for the `budget_domains` largest domains, and at least for the largest route of the stream
        sizes = sorted(sr.cache.sizes.values())
        need = max(sum(sr.cache.sizes[d] for d in live_domains(StacksOn.weighted(w), sr.domains)) for w in routes)
        sr.cache.budget = max(sum(sizes[-budget_domains:]), need)
        base_s, routed_s = [], []
        for raw, ids, weights in zip(raws, ids_list, routes):
            sr.route(raw)  # timed by the engine (a synthetic run's arbitrary probabilities are not used)
            x = torch.tensor([ids])
            start = time.perf_counter()
            with torch.no_grad(), stacks_on(sr.model, StacksOn.base_only()):
                sr.model.generate(x, n_new)
            base_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            with torch.no_grad(), stacks_on(sr.model, sr.stacks_for(weights)):
                sr.model.generate(x, n_new)
            routed_s.append(time.perf_counter() - start + sr.cache.stats.route_seconds[-1])
        stats = sr.cache.stats
        sr.cache.close()
    tokens = n_new * n_prompts
    loads = [load["seconds"] / load["stacks"] for load in stats.loads]
    return {
        "run": run or "synthetic (quick model, random weights)", "n_prompts": n_prompts, "stay": stay,
        "n_new": n_new, "budget_mb": sr.cache.budget / 2**20, "budget_domains": budget_domains,
        "stack_mb": {d: s / 2**20 for d, s in sr.cache.sizes.items()},
        "hits": stats.hits, "misses": stats.misses, "evictions": stats.evictions, "hit_rate": stats.hit_rate,
        "load_ms_per_stack": 1000 * statistics.median(loads) if loads else None,
        "load_ms_per_stack_mean": 1000 * stats.seconds_per_stack() if loads else None,
        "router_ms": 1000 * statistics.median(stats.route_seconds),
        "base_tokens_per_s": tokens / sum(base_s), "routed_tokens_per_s": tokens / sum(routed_s),
        "routed_over_base_time": sum(routed_s) / sum(base_s),
        "load_share_of_routed": sum(load["seconds"] for load in stats.loads) / sum(routed_s),
        "load_average": load, "threads": torch.get_num_threads(),
    }


def format_bench_engine(r: dict) -> str:
    sizes = ", ".join(f"{d} {mb:.2f}" for d, mb in r["stack_mb"].items())
    lines = [
        f"engine over a stream of {r['n_prompts']} prompts ({r['run']}); next prompt of the same domain with "
        f"probability {r['stay']:.2f}; budget {r['budget_mb']:.2f} MB (the {r['budget_domains']} largest domains, "
        "or the largest route)",
        f"  stacks per domain (MB): {sizes}",
        f"  cache: {r['hits']} hits, {r['misses']} misses, hit rate {r['hit_rate']:.0%}, {r['evictions']} evictions",
        f"  load: {r['load_ms_per_stack']:.1f} ms per stack (median; mean {r['load_ms_per_stack_mean']:.1f}), "
        f"read + sha256 + install",
        f"  router: {r['router_ms']:.1f} ms per prompt (median)",
        f"  generation, {r['n_new']} new tokens a prompt: base {r['base_tokens_per_s']:.0f} tokens/s, routed "
        f"{r['routed_tokens_per_s']:.0f} tokens/s with router and loads: {r['routed_over_base_time']:.2f}x the "
        f"base's time, {r['load_share_of_routed']:.0%} of it loading stacks",
    ]
    busy = busy_machine([], r["load_average"])
    if busy.load is not None:
        lines.append(f"  warning: the load average was {busy.load:.1f} before the run: other processes had the "
                     "cores, so the times are slower than this machine's")
    return "\n".join(lines)
