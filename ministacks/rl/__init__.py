"""RL after SFT on a domain's last stack (docs/brainstacks.md §8): the objectives written out (objectives.py),
checked rewards (rewards.py), pairs and sampled groups (samples.py), the guard against blow-ups (guard.py)
and the loop that runs them before the stack is frozen (loop.py)."""
