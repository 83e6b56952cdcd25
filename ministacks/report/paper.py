"""Every number this project quotes from the paper (arXiv 2604.01152), in one place, with where it is from.

Results files carry them under a "paper" key and the report puts each beside ours, so a reader sees
the paper's value next to the miniature's, and where the finding does not reproduce the report says
so. Nothing here is ever compared with a tolerance or used to pick a setting.
"""

from ..stacks.proportions import PAPER_STACK_SHARE  # one stack's share of each paper base (needed there too)

__all__ = ["PAPER_STACK_SHARE", "PAPER_EXP1", "PAPER_BOOST", "PAPER_FORGETTING", "PAPER_ORACLE", "PAPER_TABLE4",
           "GENERAL_BENCHMARKS", "PAPER_RL", "PAPER_PSN"]

# Experiment 1 and residual boosting: the paper's TinyLlama runs
PAPER_EXP1 = {  # docs/brainstacks.md §9: TinyLlama-1.1B 4-bit, alpaca, val loss every 50 steps
    "steps": [50, 100, 150, 200, 250, 300, 350, 400],
    "moe": [0.9131, 0.8946, 0.8876, 0.8812, 0.8779, 0.8745, 0.8724, 0.8715],
    "lora": [0.9194, 0.9127, 0.9045, 0.8960, 0.8891, 0.8823, 0.8766, 0.8741],
    "params": {"moe": 53.6e6, "lora": 50.5e6},
    "minutes": {"moe": 20.2, "lora": 9.5},
}
PAPER_BOOST = {"round2_best": 0.8531, "note": "round 2 best; round 3 was worse (TinyLlama, chat)"}


# docs/brainstacks.md §5: TinyLlama, ungated validation loss, rows = after training, NoNS -> NS (curriculum chat, code,
# medical, math as in the paper's own run)
PAPER_FORGETTING = {
    "domains": ["chat", "code", "medical", "math"],
    "without null-space": [[None] * 4, [1.507, 0.788, None, None], [1.468, 0.814, 1.350, None],
                           [1.839, 1.512, 2.066, 1.184]],
    "with null-space": [[None] * 4, [1.477, 0.819, None, None], [1.453, 0.816, 1.234, None],
                        [1.778, 1.452, 1.984, 1.041]],
}


# docs/brainstacks.md §6: the paper's oracle on medical prompts (Gemma 3 12B): chat+math 32 of 33, medical alone 1 of 33
PAPER_ORACLE = {"medical": {"chat+math": 32 / 33, "medical": 1 / 33}}

# docs/brainstacks.md §8: PSN, Brainstacks without (v1) and beside (v2) a pretrained geometry
PAPER_PSN = {
    "v1": ("a randomly initialised GPT-2-size model (12 layers, 1024 hidden) trained with stacking and null-space "
           "across six domains converges per domain, but its quality is poor: LoRA corrections need a pretrained "
           "geometry to refine"),
    "v2": {"oracle_gain_nats": (2.4, 5.2), "router_single_top1": 1.0, "router_mixed_match": 1.0},
}

# docs/brainstacks.md §8: per-domain RL after SFT, on the domain's last stack before it is frozen
PAPER_RL = ("DPO on chat worked; GRPO on code blew up (loss ~2.8e7) and ruined every stack trained on top of "
            "it, hence the spike guard. No RL hyperparameters or numbers are published.")


# docs/brainstacks.md §9, Exp 3 (Gemma 3 12B IT, NF4, 5 domains x 2 rounds, 200 samples each): base -> routed
PAPER_TABLE4 = {
    "HellaSwag": (0.670, 0.650), "ARC-Easy": (0.510, 0.515), "ARC-Challenge": (0.525, 0.495),
    "TruthfulQA MC1": (0.350, 0.370), "MMLU": (0.450, 0.435), "GSM8K": (0.665, 0.665),
    "MedQA": (0.385, 0.350), "MedMCQA": (0.330, 0.360),
}
# Table 4's benchmarks of no domain's (GSM8K is math's, MedQA and MedMCQA medical's): the general ability
# the paper's routing keeps, which the general held-out text stands in for here
GENERAL_BENCHMARKS = ("HellaSwag", "ARC-Easy", "ARC-Challenge", "TruthfulQA MC1", "MMLU")
