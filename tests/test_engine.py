"""The disk-offloaded engine (inference/offload.py): the logits of a model holding every stack, whatever
order the domains come and go in; least-recently-used eviction under a budget; exact hit/miss counts."""

import pytest
import torch

from ministacks.inference.offload import StackCache, live_domains
from ministacks.inference.stacked import StackedRun
from ministacks.lm.model import ModelConfig, Transformer
from ministacks.stacks.domains import domain_order, load_domain, resident_bytes, stack_bytes, unload_domain
from ministacks.stacks.fingerprint import base_fingerprint
from ministacks.stacks.layer import (AdapterConfig, StacksOn, add_stack, freeze_active, inject_stacks, make_adapter,
                                     stacked_layers, stacks_on)
from ministacks.stacks.manifest import new_manifest, read_manifest, write_manifest
from ministacks.stacks.store import DamagedStacksError, load_all_stacks, read_record, save_stack, stack_paths

CFG = ModelConfig(vocab_size=97, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=32)
DOMAINS = ["chat", "code", "math"]
SMALL = AdapterConfig(n_experts=2, r=4, top_k=1)
# rounds per domain in training order, with differing sizes: chat 2 rounds, code 1 small, math 2 (one small)
PLAN = [("chat", 1, AdapterConfig()), ("chat", 2, AdapterConfig()), ("code", 1, SMALL),
        ("math", 1, AdapterConfig()), ("math", 2, SMALL)]


class FakeTokenizer:
    def fingerprint(self):
        return "tok123"

    def encode(self, text, bos=False):
        return [1 + (ord(c) % 90) for c in text][:20]


def _base():
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    inject_stacks(model)
    return model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run of 3 domains, 5 stacks (random B so each stack changes the output), saved as training saves them."""
    run = tmp_path_factory.mktemp("run")
    model = _base()
    manifest = new_manifest(model, FakeTokenizer(), DOMAINS, {"seed": 0})
    torch.manual_seed(1)
    for domain, rnd, cfg in PLAN:
        add_stack(model, make_adapter("moe", cfg))
        with torch.no_grad():
            for layer in stacked_layers(model):
                layer.active.lora_B.normal_(std=0.05)
        freeze_active(model, domain)
        save_stack(run, model, domain, rnd, "moe", cfg, meta={})
        manifest["stacks"].append({"domain": domain, "round": rnd})
        write_manifest(run, manifest)
    return run


def _x():
    return torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))


def _logits(model, on):
    with torch.no_grad(), stacks_on(model, on):
        return model(_x()).logits


def _full(run):
    model = _base()
    load_all_stacks(run, model, read_manifest(run), strict=True)
    return model


def test_sizes_come_from_the_records_and_match_the_loaded_tensors(run):
    manifest = read_manifest(run)
    model = _base()
    cache = StackCache(run, model, manifest)
    for d in DOMAINS:
        load_domain(run, model, manifest, d, base_fingerprint(model))
        assert cache.sizes[d] == resident_bytes(model, d) > 0
    assert cache.sizes["code"] < cache.sizes["math"] < cache.sizes["chat"]  # 1 small < 1 full + 1 small < 2 full
    assert stack_bytes(model, read_record(run, "code", 1)) == cache.sizes["code"]


def test_any_load_order_gives_the_logits_of_the_model_with_every_stack(run):
    """Keyed by domain: the released engine's weights-by-position bug would weight code with chat's weight
    after loading out of order; here each route's logits are bitwise those of the full model."""
    full = _full(run)
    manifest = read_manifest(run)
    model = _base()
    fp = base_fingerprint(model)
    routes = [StacksOn.weighted({"chat": 0.2, "code": 0.9}), StacksOn.weighted({"math": 0.7, "chat": 0.3}),
              StacksOn.weighted({"code": 0.4, "math": 0.95})]
    for order in (["math", "code", "chat"], ["code", "chat"], ["chat", "math"]):
        for d in list(domain_order(manifest)):
            if any(d in layer.stacks for layer in stacked_layers(model)):
                unload_domain(model, d)
        for d in order:
            load_domain(run, model, manifest, d, fp)
        for layer in stacked_layers(model):
            assert list(layer.stacks) == [d for d in DOMAINS if d in order]  # the run's order, not the load order
        for on in routes:
            if all(d in order for d, _ in on.weights):
                assert torch.equal(_logits(model, on), _logits(full, on))
    assert not torch.equal(_logits(full, routes[0]), _logits(full, routes[1]))  # the routes differ at all


def test_least_recently_used_domain_is_evicted_and_counts_are_exact(run):
    manifest = read_manifest(run)
    probe = StackCache(run, _base(), manifest)
    budget = probe.sizes["chat"] + probe.sizes["math"]  # holds chat+math, or any two with code, never all three
    assert budget < sum(probe.sizes.values())
    model = _base()
    cache = StackCache(run, model, manifest, budget_bytes=budget)
    cache.need(["chat"])  # miss
    cache.need(["code"])  # miss
    cache.need(["chat"])  # hit: chat is now the most recently used, code the least
    cache.need(["math"])  # miss: chat + code + math is over budget, code goes
    assert list(cache.resident) == ["chat", "math"]
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (1, 3, 1)
    assert [load["domain"] for load in cache.stats.loads] == ["chat", "code", "math"]
    assert cache.used_bytes <= budget
    for layer in stacked_layers(model):
        assert list(layer.stacks) == ["chat", "math"]
    cache.need(["code", "math"])  # math hit; code miss: chat (least recent outside the prompt) goes
    assert list(cache.resident) == ["math", "code"] and cache.stats.evictions == 2
    on = StacksOn.weighted({"code": 0.6, "math": 0.8})
    assert torch.equal(_logits(model, on), _logits(_full(run), on))


def test_a_prompt_over_the_budget_is_refused_and_changes_nothing(run):
    manifest = read_manifest(run)
    model = _base()
    sizes = StackCache(run, _base(), manifest).sizes
    cache = StackCache(run, model, manifest, budget_bytes=sizes["chat"] + sizes["code"])
    cache.need(["code"])
    with pytest.raises(ValueError, match="over the"):
        cache.need(["chat", "math"])
    assert list(cache.resident) == ["code"] and cache.stats.misses == 1
    with pytest.raises(ValueError, match="no stacks for law"):
        cache.need(["law"])
    with pytest.raises(ValueError, match="positive"):
        StackCache(run, model, manifest, budget_bytes=0)


def test_prefetch_reads_ahead_and_the_result_is_the_same(run):
    manifest = read_manifest(run)
    model = _base()
    cache = StackCache(run, model, manifest, prefetch=True)
    cache.prefetch(["math", "code"])
    cache.need(["math"])
    cache.need(["chat"])
    cache.close()
    assert [(load["domain"], load["prefetched"]) for load in cache.stats.loads] == [("math", True), ("chat", False)]
    on = StacksOn.weighted({"math": 0.5, "chat": 0.5})
    assert torch.equal(_logits(model, on), _logits(_full(run), on))


def test_a_damaged_stack_is_named_when_its_domain_is_needed_and_the_model_is_unchanged(run, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    tensors, _ = stack_paths(bad, "math", 2)
    data = bytearray(tensors.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tensors.write_bytes(bytes(data))
    model = _base()
    cache = StackCache(bad, model, read_manifest(bad))
    with pytest.raises(DamagedStacksError, match="math_r02") as e:
        cache.need(["math"])
    assert f"repair --run {bad} --from math:2" in str(e.value)
    assert not any("math" in layer.stacks for layer in stacked_layers(model))  # round 1 was taken out again
    cache.need(["code"])  # the rest of the run still answers
    assert list(cache.resident) == ["code"]


def test_stacked_run_loads_only_what_each_mode_runs(run):
    model = _base()
    sr = StackedRun(model, FakeTokenizer(), tuple(DOMAINS), cache=StackCache(run, model, read_manifest(run)))
    assert live_domains(sr.stacks_for("base"), DOMAINS) == [] and not sr.cache.resident
    sr.stacks_for({"code": 1.0, "math": 0.1})  # math at 0.1 is under the skip threshold: not loaded
    assert list(sr.cache.resident) == ["code"]
    on = sr.stacks_for("ungated")
    assert sorted(sr.cache.resident) == sorted(DOMAINS) and (sr.cache.stats.hits, sr.cache.stats.misses) == (1, 3)
    assert torch.equal(_logits(model, on), _logits(_full(run), on))


def test_a_missing_or_truncated_stack_refuses_the_run_before_any_answer(run, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    tensors, _ = stack_paths(bad, "code", 1)
    tensors.write_bytes(tensors.read_bytes()[:100])
    stack_paths(bad, "math", 2)[0].unlink()
    with pytest.raises(DamagedStacksError, match="2 stack file") as e:
        StackCache(bad, _base(), read_manifest(bad))
    assert "truncated" in str(e.value) and "missing" in str(e.value) and "--from code:1" in str(e.value)


def test_bench_engine_counts_every_domain_request_of_its_synthetic_stream():
    from ministacks.bench.engine import bench_engine, domain_stream, synthetic_route

    r = bench_engine(n_prompts=6, n_new=2, prompt_len=8, seed=1)
    requests = sum(len(synthetic_route(d)) for d in domain_stream(6, 0.5, 1))  # chat + the domain, chat alone
    assert r["hits"] + r["misses"] == requests
    assert r["misses"] >= len(set(domain_stream(6, 0.5, 1)) | {"chat"})  # each domain's first request misses
    assert r["router_ms"] > 0 and r["load_ms_per_stack"] > 0 and r["routed_tokens_per_s"] > 0
