"""PSN v1: the random base really is the untrained network pretraining started from, and the psn command puts
the continual run on it beside the same run on the pretrained base."""

import json
import math
from dataclasses import replace

import pytest
import torch

from ministacks.lm.base import load_base
from ministacks.lm.model import Transformer
from ministacks.presets import SMOKE, with_vocab
from ministacks.stages.pretrain import ensure_base
from ministacks.stages.psn import RANDOM, psn_v1, write_random_base

PRESET = replace(SMOKE, continual=replace(SMOKE.continual, domains=("chat", "math"), rounds=1, steps=4, ns_examples=8),
                 stack=replace(SMOKE.stack, eval_every=2, max_val_examples=8))


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    folder = tmp_path_factory.mktemp("psn")
    ensure_base(PRESET, folder, progress=False)
    return folder


def test_the_random_base_is_untrained_and_shares_the_tokenizer(out):
    folder = out / RANDOM
    write_random_base(PRESET, out, folder)
    random_model, tok = load_base(folder)
    pretrained, _ = load_base(out)
    assert (folder / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    torch.manual_seed(PRESET.pretrain.seed)
    fresh = Transformer(with_vocab(PRESET, tok.vocab_size).model)  # the network as pretraining initialises it
    for (name, a), b, c in zip(random_model.state_dict().items(), fresh.state_dict().values(),
                               pretrained.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(random_model.state_dict().values(), pretrained.state_dict().values()))
    record = json.loads((folder / "base" / "config.json").read_text())
    assert record["pretrain"]["steps"] == 0
    assert not (folder / "checkpoints").exists()  # nothing was pretrained there


def test_psn_v1_puts_both_runs_side_by_side(out, capsys):
    r = psn_v1(PRESET, out, progress=False)["v1"]
    rnd, pre = r["random"], r["pretrained"]
    assert rnd["domains"] == pre["domains"] == ["chat", "math"]
    for run in (rnd, pre):
        assert all(math.isfinite(run["before"][d]) and math.isfinite(run["after"][d]) for d in run["domains"])
        assert len(run["forgetting"]) == 2 and set(run["samples"]) == {"chat", "math"}
    # a random base predicts tokens about uniformly: its first loss is near ln(V), far above the pretrained one's
    vocab = load_base(out)[1].vocab_size
    assert abs(rnd["before"]["chat"] - math.log(vocab)) < 1.0 and rnd["before"]["chat"] > pre["before"]["chat"] + 1.0
    assert (out / "psn.png").stat().st_size > 10_000
    saved = json.loads((out / "psn.json").read_text())
    assert saved["v1"]["random"]["after"] == rnd["after"] and "paper" in saved


def test_psn_v2_trains_a_block_per_domain_and_measures_its_oracle_gain(out):
    from ministacks.stages.psn import V2, psn_v2

    preset = replace(PRESET, continual=replace(PRESET.continual, domains=("chat", "code")))
    previous = json.loads((out / "psn.json").read_text()) if (out / "psn.json").is_file() else {}
    r = psn_v2(preset, out, progress=False)
    assert list(r["oracle"]) == ["chat", "code"]
    for d, o in r["oracle"].items():
        assert math.isclose(o["gain"], o["without"] - o["with"]) and o["n"] > 0
        assert r["blocks"][d]["best_loss"] <= r["blocks"][d]["pre_loss"]  # the best snapshot, or the identity
    assert r["blocks"]["chat"]["protected"] == 0 and r["blocks"]["code"]["protected"] > 0  # code kept out of chat's
    assert set(r["figure12"]["answers"]) == {"without", "with the code block"}
    router = r["router"]  # the meta-router over the blocks, scored on held-out prompts
    assert 0.0 <= router["single_top1"] <= 1.0 and router["n_prompts"]["val"] > 0
    assert set(router["oracle"]) == {"chat", "code"}  # each domain's winning block combinations
    assert (out / V2 / "blocks" / "code.safetensors").is_file() and (out / "psn_v2.png").stat().st_size > 10_000
    again = psn_v2(preset, out, progress=False)  # the blocks load from their files: the same numbers
    assert again["oracle"] == r["oracle"]
    saved = json.loads((out / "psn.json").read_text())
    assert "v2" in saved and saved.get("v1") == previous.get("v1")  # v2 is added beside v1's result, never over it


def test_the_report_section_is_generated_from_psn_json(out):
    from ministacks.report.psn import psn_section
    from ministacks.stages.psn import psn_v2

    psn_v1(PRESET, out, progress=False)  # both runs are finished by the tests above: this only reads them
    psn_v2(replace(PRESET, continual=replace(PRESET.continual, domains=("chat", "code"))), out, progress=False)
    saved = json.loads((out / "psn.json").read_text())
    text = psn_section(saved)
    for d in saved["v1"]["random"]["domains"]:
        gain = saved["v1"]["random"]["before"][d] - saved["v1"]["random"]["after"][d]
        assert f"lower the random base's loss by {gain:.3f} nats" in text
    for d, o in saved["v2"]["oracle"].items():
        assert f"| {d} | {o['without']:.3f} | {o['with']:.3f} | {o['gain']:+.3f} |" in text
    assert "Figure 12" in text and "## PSN v2" in text
    assert f"single-domain top-1 {saved['v2']['router']['single_top1']:.0%}" in text
