"""A stack's size against its base: the paper's share kept on the miniature (stacks/proportions.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ministacks.lm.model import Transformer
from ministacks.presets import PAPER, QUICK, SMOKE, literal
from ministacks.stacks.layer import AdapterConfig, add_stack, inject_stacks, make_adapter
from ministacks.stacks.proportions import PAPER_STACK_SHARE, scaled_adapter, stack_params, stack_share


def _built(model_cfg, cfg, kind):
    model = Transformer(model_cfg)
    base = model.num_params()
    inject_stacks(model)
    return base, sum(p.numel() for p in add_stack(model, make_adapter(kind, cfg)))


@pytest.mark.parametrize("preset", [QUICK, PAPER])
@pytest.mark.parametrize("kind", ["moe", "lora"])
def test_the_count_is_the_stack_that_is_built(preset, kind):
    model_cfg = replace(preset.model, vocab_size=preset.vocab_size)
    for cfg in (preset.adapter, AdapterConfig()):
        base, built = _built(model_cfg, cfg, kind)
        assert stack_params(model_cfg, cfg, kind) == built
        if kind == "moe":
            assert stack_share(model_cfg, cfg) == pytest.approx(built / base)


@pytest.mark.parametrize("preset", [QUICK, PAPER])
def test_the_quick_and_paper_presets_keep_the_papers_proportions(preset):
    model_cfg = replace(preset.model, vocab_size=preset.vocab_size)
    a = preset.adapter
    assert (a.n_experts, a.top_k, a.routing) == (4, 2, "top_k")  # the paper's experts and routing are kept
    assert 0.02 <= stack_share(model_cfg, a) <= 0.06  # the paper: 4.9% (TinyLlama), 2.3% (Gemma 3 12B)
    # the literal 4 x r16 would be a quarter or more of this base: why the rank is scaled
    assert stack_share(model_cfg, AdapterConfig()) > 0.2
    # Exp 1 stays parameter-matched when the routers are a visible part of a small stack
    assert stack_params(model_cfg, a, "lora") / stack_params(model_cfg, a, "moe") == pytest.approx(1, abs=0.05)


def test_the_rank_is_the_one_nearest_the_target_share():
    model_cfg = replace(QUICK.model, vocab_size=QUICK.vocab_size)
    a = scaled_adapter(model_cfg)
    gap = abs(stack_share(model_cfg, a) - PAPER_STACK_SHARE["TinyLlama-1.1B"])
    for r in range(1, 17):
        assert gap <= abs(stack_share(model_cfg, replace(a, r=r)) - PAPER_STACK_SHARE["TinyLlama-1.1B"])
    assert scaled_adapter(model_cfg, share=0.30).r > a.r  # a larger share asks a larger rank


def test_the_smoke_preset_keeps_the_papers_literal_adapter():
    assert SMOKE.adapter == AdapterConfig() and (AdapterConfig().r, AdapterConfig().lora_r) == (16, 64)


@pytest.mark.parametrize("preset", [QUICK, PAPER])
def test_literal_is_the_preset_before_the_proportions_and_the_template(preset):
    lit = literal(preset)
    assert lit.adapter == AdapterConfig() and lit.adapter != preset.adapter
    assert lit.pretrain.template_share == 0 < preset.pretrain.template_share
    assert lit.name == f"{preset.name}-literal"
    # nothing else differs: the two runs compare the two choices alone
    assert replace(lit, name=preset.name, adapter=preset.adapter, pretrain=preset.pretrain) == preset
    # smoke already is literal
    assert literal(SMOKE) == replace(SMOKE, name="smoke-literal")
