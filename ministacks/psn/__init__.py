"""PSN v2's capability blocks (docs/brainstacks.md §8): blocks.py (the block and its MoE projections) and model.py
(a frozen base with blocks beside it)."""
