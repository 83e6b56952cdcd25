"""ministacks: Brainstacks — frozen MoE-LoRA adapter stacks for continual multi-domain fine-tuning — from scratch.

Modules
  model.py      a LLaMA-style decoder written from scratch (RMSNorm, RoPE, SwiGLU, GQA, KV cache)
  tokenizer.py  byte-level BPE trained with `tokenizers`
  data/         five real domain corpora that install offline, splits, user data
  pretrain.py   pretraining from random initialisation, with atomic checkpoints and exact resume
  presets.py    the smoke / quick / paper presets, in one place
  __main__.py   the command line: `python -m ministacks {demo,pretrain,bench} ...`
"""

__version__ = "0.1.0"
