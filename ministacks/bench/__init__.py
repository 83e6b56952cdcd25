"""Speed measurements, each a `python -m ministacks bench ...` command (bench/command.py).

  timing.py     the one timing loop: interleaved rounds, a time budget, medians, spread, busy warnings
  pretrain.py   pretraining tokens/s and model-FLOPs utilisation against the measured matmul peak
  moe.py        MoE-LoRA vs the parameter-matched LoRA vs the released code's dense einsums
  nf4.py        a frozen 4-bit (NF4) base vs fp32: step time and memory
  nullspace.py  the null-space projection's step-time overhead; randomized vs full SVD
  route.py      inference: the base alone vs ungated stacks (fused, stack by stack) vs a routed answer
  command.py    the `bench` command of the CLI
"""
