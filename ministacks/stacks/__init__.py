"""Frozen stacks on a frozen base: the stacked layer, stacks on disk, and the run's manifest (docs/brainstacks.md §2, §7)."""
