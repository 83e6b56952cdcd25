"""Which domains' stacks a prompt needs: the oracle's targets and the outcome-based meta-router (docs/brainstacks.md §6)."""
