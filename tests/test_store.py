"""Stacks on disk: a reloaded stack is bitwise the stack that was saved; bad files are named, not loaded."""

import ast
import inspect
import json

import pytest
import torch

import ministacks.stacks.store as store
from ministacks.lm.model import ModelConfig, Transformer
from ministacks.stacks.layer import (AdapterConfig, add_stack, freeze_active, inject_stacks, make_adapter, stacked_layers)
from ministacks.stacks.fingerprint import base_fingerprint
from ministacks.stacks.store import ForeignBaseError, StackFileError, load_all_stacks, load_stack, record_checksum, save_stack, stack_paths
from ministacks.stacks.manifest import new_manifest, read_manifest, write_manifest

from damage import flip_middle_byte, truncate

CFG = ModelConfig(vocab_size=97, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=32)
SMALL = AdapterConfig(n_experts=3, r=4, top_k=1, lora_alpha=8.0, use_rslora=False, lora_r=8)  # not the defaults
# (domain, round, kind, config): two domains, several rounds, both kinds, default and non-default configs
PLAN = [("chat", 1, "moe", AdapterConfig()), ("chat", 2, "lora", SMALL),
        ("code", 1, "moe", SMALL), ("code", 2, "moe", AdapterConfig()), ("chat", 3, "moe", AdapterConfig())]


class FakeTokenizer:
    def fingerprint(self):
        return "tok123"


def _base(seed=0):
    torch.manual_seed(seed)
    model = Transformer(CFG).eval()
    inject_stacks(model)
    return model


def _x():
    return torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))


def _logits(model):
    model.train(False)
    with torch.no_grad():
        return model(_x()).logits


def _trained_run(run, plan=PLAN):
    """Train (fake: random B) and save every stack of `plan`, recording each in the manifest."""
    model = _base()
    manifest = new_manifest(model, FakeTokenizer(), ["chat", "code"], {"seed": 0})
    for domain, rnd, kind, cfg in plan:
        add_stack(model, make_adapter(kind, cfg))
        with torch.no_grad():
            for layer in stacked_layers(model):
                layer.active.lora_B.normal_(std=0.05)
        freeze_active(model, domain)
        save_stack(run, model, domain, rnd, kind, cfg, meta={"val_loss": 1.0 / rnd})
        manifest["stacks"].append({"domain": domain, "round": rnd})  # last, after the stack's files
        write_manifest(run, manifest)
    return model, manifest


def test_save_load_round_trip_is_bitwise(tmp_path):
    model, _ = _trained_run(tmp_path)
    expected = _logits(model)
    assert not torch.equal(expected, _logits(_base()))  # the stacks do change the output

    fresh = _base()
    assert load_all_stacks(tmp_path, fresh, read_manifest(tmp_path)) == []
    assert torch.equal(_logits(fresh), expected)
    for layer, ref in zip(stacked_layers(fresh), stacked_layers(model)):
        assert list(layer.stacks) == list(ref.stacks)  # same domains, in the same order
        for domain in layer.stacks:
            assert [type(a) for a in layer.stacks[domain]] == [type(a) for a in ref.stacks[domain]]
            for a in layer.stacks[domain]:
                assert not a.training and all(not p.requires_grad for p in a.parameters())
    fresh.train(True)  # frozen stacks stay in eval mode while a new stack trains
    assert all(not a.training for layer in stacked_layers(fresh) for s in layer.stacks.values() for a in s)

    record = json.loads(stack_paths(tmp_path, "chat", 2)[1].read_text())
    assert record["kind"] == "lora" and AdapterConfig(**record["adapter_config"]) == SMALL
    assert record["meta"] == {"val_loss": 0.5} and record["base_fingerprint"] == base_fingerprint(model)
    with pytest.raises(ValueError, match="already in this model"):  # loading twice would double a stack
        load_stack(tmp_path, fresh, "chat", 2)


def test_load_stack_one_at_a_time_returns_the_record(tmp_path):
    model, _ = _trained_run(tmp_path, PLAN[:2])
    fresh = _base()
    assert load_stack(tmp_path, fresh, "chat", 1)["meta"] == {"val_loss": 1.0}
    assert load_stack(tmp_path, fresh, "chat", 2)["round"] == 2
    assert torch.equal(_logits(fresh), _logits(model))


def test_keep_train_mode_survives_the_round_trip(tmp_path):
    model = _base()
    add_stack(model, make_adapter("moe"))
    freeze_active(model, "chat", keep_train_mode=True)  # the released code's noisy frozen stacks
    save_stack(tmp_path, model, "chat", 1, "moe", AdapterConfig(), meta={})
    fresh = _base()
    load_stack(tmp_path, fresh, "chat", 1)
    fresh.train(True)
    assert all(layer.stacks["chat"][0].training for layer in stacked_layers(fresh))


def test_save_refuses_a_config_that_does_not_describe_the_stack(tmp_path):
    model = _base()
    add_stack(model, make_adapter("moe", SMALL))
    freeze_active(model, "chat")
    with pytest.raises(ValueError, match="AdapterConfig the stack was trained with"):
        save_stack(tmp_path, model, "chat", 1, "moe", AdapterConfig(), meta={})
    with pytest.raises(ValueError, match="no frozen stack of domain 'code'"):
        save_stack(tmp_path, model, "code", 1, "moe", SMALL, meta={})
    assert not (tmp_path / "stacks").exists()  # nothing half-written


@pytest.mark.parametrize("damage, words", [(truncate, "truncated"), (flip_middle_byte, "corrupted")])
def test_damaged_file_is_named_and_the_others_still_load(tmp_path, damage, words):
    model, manifest = _trained_run(tmp_path)
    bad = stack_paths(tmp_path, "chat", 2)[0]
    damage(bad)
    with pytest.raises(StackFileError, match=words) as err:
        load_stack(tmp_path, _base(), "chat", 2)
    assert "chat_r02.safetensors" in str(err.value) and err.value.path == bad

    fresh = _base()
    with pytest.warns(UserWarning, match="chat_r02"):
        assert load_all_stacks(tmp_path, fresh, manifest) == ["chat_r02"]
    # reference: the in-memory model without that one stack
    for layer in stacked_layers(model):
        del layer.stacks["chat"][1]
        layer.invalidate()
    assert torch.equal(_logits(fresh), _logits(model))


def test_missing_files_are_reported_clearly(tmp_path):
    _, manifest = _trained_run(tmp_path, PLAN[:3])
    tensor_file, json_file = stack_paths(tmp_path, "code", 1)
    tensor_file.unlink()
    with pytest.raises(StackFileError, match="code_r01.safetensors: missing"):
        load_stack(tmp_path, _base(), "code", 1)
    json_file.unlink()
    with pytest.raises(StackFileError, match="code_r01.json: missing"):
        load_stack(tmp_path, _base(), "code", 1)
    fresh = _base()
    with pytest.warns(UserWarning, match="code_r01"):
        assert load_all_stacks(tmp_path, fresh, manifest) == ["code_r01"]
    assert [len(layer.stacks["chat"]) for layer in stacked_layers(fresh)] == [2] * 7 * CFG.n_layer


def test_wrong_shape_is_a_clear_error_and_leaves_the_model_untouched(tmp_path):
    _trained_run(tmp_path, PLAN[:1])
    json_file = stack_paths(tmp_path, "chat", 1)[1]
    record = json.loads(json_file.read_text())
    record["adapter_config"]["r"] = 8  # the record now describes rank-8 experts; the file holds rank 16
    record["record_sha256"] = record_checksum(record)  # edited *and* re-signed: the shape check still catches it
    json_file.write_text(json.dumps(record))
    fresh = _base()
    with pytest.raises(StackFileError, match=r"lora_A has shape \[4, 16, 64\] in the file.*expects \[4, 8, 64\]"):
        load_stack(tmp_path, fresh, "chat", 1)
    assert all(len(layer.stacks) == 0 for layer in stacked_layers(fresh))


@pytest.mark.parametrize("field, value", [("lora_alpha", 32.0), ("use_rslora", False), ("top_k", 1),
                                          ("routing", "dense")])
def test_an_edited_record_is_a_load_error_naming_the_json(tmp_path, field, value):
    """The adapter settings are half of the stack: the same tensors with another alpha (or routing)
    compute another delta, so an edited record must not load."""
    _, manifest = _trained_run(tmp_path, PLAN[:2])
    json_file = stack_paths(tmp_path, "chat", 1)[1]
    record = json.loads(json_file.read_text())
    assert record["adapter_config"][field] != value
    record["adapter_config"][field] = value
    json_file.write_text(json.dumps(record, indent=2))
    fresh = _base()
    with pytest.raises(StackFileError, match=r"chat_r01\.json: edited") as err:
        load_stack(tmp_path, fresh, "chat", 1)
    assert err.value.path == json_file
    assert all(len(layer.stacks) == 0 for layer in stacked_layers(fresh))
    with pytest.warns(UserWarning, match="chat_r01"):  # in a run, reported by name; the other stacks load
        assert load_all_stacks(tmp_path, fresh, manifest) == ["chat_r01"]


def test_a_record_from_before_the_checksum_loads_with_a_warning(tmp_path):
    model, _ = _trained_run(tmp_path, PLAN[:1])
    json_file = stack_paths(tmp_path, "chat", 1)[1]
    record = json.loads(json_file.read_text())
    del record["record_sha256"]
    record["version"] = 1  # what ministacks wrote before the record had its own checksum
    json_file.write_text(json.dumps(record))
    fresh = _base()
    with pytest.warns(UserWarning, match=r"chat_r01\.json: a stack record of format version 1"):
        load_stack(tmp_path, fresh, "chat", 1)
    assert torch.equal(_logits(fresh), _logits(model))


def test_foreign_base_is_refused_with_both_fingerprints(tmp_path):
    model, manifest = _trained_run(tmp_path, PLAN[:1])
    other = _base(seed=1)
    fp_run, fp_other = base_fingerprint(model), base_fingerprint(other)
    with pytest.raises(ForeignBaseError) as err:
        load_stack(tmp_path, other, "chat", 1)
    assert fp_run in str(err.value) and fp_other in str(err.value) and "chat_r01" in str(err.value)
    with pytest.raises(ForeignBaseError, match="manifest.json"):  # a whole run on the wrong base: refused
        load_all_stacks(tmp_path, other, manifest)
    assert all(len(layer.stacks) == 0 for layer in stacked_layers(other))


def test_base_fingerprint_sees_the_base_and_only_the_base():
    torch.manual_seed(0)
    plain = Transformer(CFG)
    model = _base()
    fp = base_fingerprint(model)
    assert base_fingerprint(plain) == fp  # injection does not change it (".base_layer" is not in the hash)
    assert base_fingerprint(_base(seed=1)) != fp
    add_stack(model, make_adapter("moe"))
    assert base_fingerprint(model) == fp
    freeze_active(model, "chat")
    assert base_fingerprint(model) == fp
    layer = model.layers[0].self_attn.q_proj  # something else attached to a stacked layer is not the base either
    layer.register_buffer("basis", torch.randn(64, 4))
    assert base_fingerprint(model) == fp
    with torch.no_grad():
        model.layers[1].mlp.down_proj.base_layer.weight[3, 5] += 1e-3  # one base weight
    assert base_fingerprint(model) != fp


def test_manifest_round_trip(tmp_path):
    assert read_manifest(tmp_path) is None
    model = _base()
    m = new_manifest(model, FakeTokenizer(), ["chat", "code", "math"], {"lr": 2e-4})
    assert m["base_fingerprint"] == base_fingerprint(model) and m["tokenizer"] == "tok123"
    assert m["forgetting"]["matrix"] == [[None] * 3 for _ in range(3)] and m["version"] == 1
    m["stacks"].append({"domain": "chat", "round": 1})
    m["forgetting"]["matrix"][0][0] = 1.25
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
        read_manifest(tmp_path)
    with pytest.raises(ValueError, match="becomes a file name"):
        new_manifest(model, FakeTokenizer(), ["chat.v2"], {})


def test_no_pickle_anywhere(tmp_path):
    tree = ast.parse(inspect.getsource(store))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any("pickle" in n for n in names)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch":
            assert node.attr not in ("save", "load")
    _trained_run(tmp_path, PLAN[:2])
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} == {".safetensors", ".json"}
    for p in files:
        if p.suffix == ".safetensors":  # 8-byte little-endian header length, then a JSON header
            assert p.read_bytes()[8:9] == b"{"
