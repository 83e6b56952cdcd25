"""The routing benchmark: it runs, reports every variant, and times the real paths (no timing assertions)."""

import copy
import json

import torch

from ministacks.bench.route import (
    FORWARD,
    GENERATE,
    ROUTE,
    ROUTED_PARTS,
    base_forward,
    bench_route,
    format_bench_route,
    loop_forward,
    routed_forward,
    routed_generate,
    stacked_model,
)
from ministacks.data.example import DOMAINS
from ministacks.lm.model import ModelConfig
from ministacks.routing.router import MetaRouter, RouterConfig
from ministacks.stacks.layer import StacksOn, set_stacks, stacked_layers

TINY = ModelConfig(vocab_size=97, n_layer=1, d_model=64, n_head=4, n_kv_head=2, max_seq_len=32)


def _ids(batch=2, seq=16):
    return torch.randint(0, TINY.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))


def test_bench_route_structure_and_report():
    d = bench_route(configs={"tiny": TINY}, batch_size=2, seq_len=16, n_new=4, rounds=1)
    json.dumps(d)  # the CLI's --json
    r = d["configs"]["tiny"]
    assert r["rounds"] == 1
    assert set(r["forward"]["seconds"]) == set(FORWARD)
    assert set(r["generate"]["seconds"]) == set(GENERATE)
    assert set(r["forward"]["ratios"]) == {"fused/base", "loop/base", "loop/fused", "routed/base"}
    assert set(r["generate"]["ratios"]) == {"fused/base", "routed/base"}
    for kind in ("forward", "generate"):
        m = r[kind]
        assert set(m["routed_parts"]) == set(ROUTED_PARTS)
        assert 0 < m["router_share"]["total"] < 1
        assert set(m["router_share"]) == {"features", "router", "total"}
        assert isinstance(m["target_met"], bool)
        assert all(s > 0 for s in m["seconds"].values())
    assert d["stacks"] == 10 and d["live_stacks"] == 4
    assert "load_before" in d and d["cores"] >= 1

    text = format_bench_route(d)
    for needle in ("base alone", "ungated, fused", "stack by stack", "routed", "forward", "generate",
                   "chat 0.2", "math 0.9", "router's share", "target routed <= 1.3x base", "with free stacks"):
        assert needle in text, needle

    # the two busy-machine warnings, on a planted spread and load average
    for kind in ("forward", "generate"):
        r[kind]["spread"] = {k: 1.0 for k in r[kind]["spread"]}
    d["load_before"] = 0.2
    assert "warning" not in format_bench_route(d)
    r["generate"]["spread"]["routed"] = 1.5
    d["load_before"] = 3.0
    text = format_bench_route(d)
    assert "warning: median runs up to 1.50x the fastest" in text
    assert "warning: the load average was 3.0 on" in text


@torch.no_grad()
def test_routed_forward_is_the_forward_with_the_routes_weights():
    model = stacked_model(TINY)
    reference = copy.deepcopy(model)
    router = MetaRouter(TINY.d_model, DOMAINS, RouterConfig()).eval()
    ids = _ids()
    logits, parts = routed_forward(model, router, ids)
    assert set(parts) == set(ROUTED_PARTS)

    set_stacks(reference, StacksOn.weighted(ROUTE))
    torch.testing.assert_close(logits, reference(ids).logits)
    # the route matters: neither the base alone nor every stack at 1 gives these logits
    set_stacks(reference, StacksOn.ungated())
    assert not torch.allclose(logits, reference(ids).logits, atol=1e-4)
    assert not torch.allclose(logits, base_forward(reference, ids), atol=1e-4)

    seq, _ = routed_generate(model, router, ids[:1], 4)
    set_stacks(reference, StacksOn.weighted(ROUTE))
    assert torch.equal(seq, reference.generate(ids[:1], 4))


@torch.no_grad()
def test_loop_and_fused_agree_on_the_benchmarks_model():
    model = stacked_model(TINY)
    ids = _ids()
    fused = model(ids).logits
    loop = loop_forward(model, ids)
    assert all(layer.use_fused for layer in stacked_layers(model))  # restored
    torch.testing.assert_close(loop, fused, rtol=1e-4, atol=1e-5)
    # the stacks do work (random B): without them the logits differ
    assert not torch.allclose(fused, base_forward(model, ids), atol=1e-4)
    assert not any(layer.on.base for layer in stacked_layers(model))  # restored
