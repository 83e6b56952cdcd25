"""Data-parallel stack training (scale/ddp.py): two CPU processes under torchrun (gloo, DDP), each with half of
the global batch, train the same stack as one process with the whole batch, on an NF4 Hugging Face base."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ministacks.data import load_split
from ministacks.lm.tokenizer import BOS, EOS, PAD, Tokenizer
from ministacks.presets import SMOKE


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Llama with a tokenizer of its own, saved as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    bpe = Tokenizer.train([ex.text() for ex in load_split("chat", "train", SMOKE.data)], vocab_size=320)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe.hf, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 max_position_embeddings=128)).save_pretrained(folder)
    return folder


def _train(base, out, processes: int, kind: str) -> tuple[dict, dict]:
    """(the trained stack, the first step's gradients) of a run over `processes` processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    grads = out.with_suffix(".grads.safetensors")
    args = ["-m", "scale.ddp", "--base", str(base), "--out", str(out), "--kind", kind, "--steps", "4",
            "--grads", str(grads)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd = launcher + args if processes > 1 else [sys.executable] + args
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(out), load_file(grads)


def test_two_processes_train_the_stack_one_process_trains(base, tmp_path):
    one, g_one = _train(base, tmp_path / "one.safetensors", 1, "lora")
    two, g_two = _train(base, tmp_path / "two.safetensors", 2, "lora")
    assert one.keys() == two.keys() and len(one) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    # the first step's gradient: two processes' halves, averaged by DDP, are the whole batch's (to float order)
    assert any(g.abs().max() > 0 for g in g_one.values())
    for k in g_one:
        assert torch.allclose(g_one[k], g_two[k], rtol=1e-4, atol=1e-7), k
    # after 4 AdamW steps the stacks agree to within 1% of their scale: Adam divides by the gradients' own size,
    # so elements whose gradient is near zero carry the float-order differences furthest (measured 0.2% and 0.28%
    # of the scale on two machines; without DDP the first-step gradients above already differ by the half batch)
    scale = max(t.abs().max() for t in one.values())
    assert scale > 0  # it trained (B starts at zero)
    for k in one:
        assert (one[k] - two[k]).abs().max() <= 1e-2 * scale, k
