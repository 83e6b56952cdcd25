"""The scale path on a CUDA GPU: NF4 with bf16 compute, fp32 stacks in mixed precision (stacks/layer.py), ministacks'
data on the CPU and the base on the GPU (scale/model.py), the real SmolLM2, and a whole experiment script.
Skipped without CUDA; on a GPU machine: `python -m pytest -m gpu`."""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: python -m pytest -m gpu")]


def test_an_nf4_base_on_the_gpu_computes_in_bf16_and_trains_fp32_stacks(tmp_path):
    from ministacks.data import load_split
    from ministacks.presets import SMOKE
    from ministacks.stacks.layer import AdapterConfig, add_stack, freeze_active, make_adapter
    from ministacks.stacks.fingerprint import base_fingerprint
    from ministacks.training.examples import ExampleSet, PackedExamples, example_loss
    from ministacks.training.sft import StackTrainConfig, train_round
    from scale.model import open_pretrained, write_pretrained
    from scale.tiny import tiny_base

    folder = tiny_base(tmp_path / "tiny", data=SMOKE.data)
    write_pretrained(tmp_path / "run", folder, 256)
    model, tok = open_pretrained(tmp_path / "run", quant="nf4", device="cuda")
    assert model.device.type == "cuda" and model.hf.get_input_embeddings().weight.dtype == torch.bfloat16
    fingerprint = base_fingerprint(model)
    train = PackedExamples(tok, load_split("chat", "train", SMOKE.data), completion_only=False, seq_len=64)
    val = ExampleSet(tok, load_split("chat", "val", SMOKE.data)[:8], completion_only=False, max_len=128)
    cfg = StackTrainConfig(steps=12, batch_size=4, seq_len=64, lr=1e-2, warmup_steps=2, eval_every=4)
    adapter = AdapterConfig(n_experts=4, r=2, top_k=2)
    result = train_round(model, make_adapter("moe", adapter), train, lambda: example_loss(model, val), cfg,
                         progress=False)
    assert result.best_loss < result.pre_loss
    freeze_active(model, "chat")
    params = add_stack(model, make_adapter("moe", adapter))  # a second stack trains over the frozen one
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in params)
    x, y = train.batch(0, 2, seed=0)
    model.train()
    model(x, labels=y).loss.backward()
    assert all(p.grad is not None for p in params[:2])
    assert base_fingerprint(model) == fingerprint
    out = model.generate(torch.tensor([tok.encode("Hello", bos=True)]), 4)
    assert out.device.type == "cpu" and out.shape[1] > 1


def test_smollm2_answers_on_the_gpu():
    from scale.bases import inject_stacks, load_base
    from scale.smollm2 import smollm2_checkpoint
    from scale.tokens import PretrainedTokenizer

    path = smollm2_checkpoint()
    model = load_base(path, quant="nf4", device="cuda")
    assert len(inject_stacks(model)) == 210
    tok = PretrainedTokenizer.from_pretrained(path)
    prompt = tok.hf.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok.encode(prompt)], device="cuda")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:].tolist())


def test_an_experiment_script_runs_end_to_end_on_the_gpu(tmp_path):
    from scale.experiments import main

    assert main("cpu", ["--tiny", "--out", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "report.md").is_file() and (tmp_path / "nullspace" / "eval.json").is_file()
