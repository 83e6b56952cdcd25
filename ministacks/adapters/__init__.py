"""What one stack is made of in every projection: the single LoRA and MoE-LoRA (docs/brainstacks.md §1)."""
