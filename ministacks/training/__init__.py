"""Training stacks: the data and the loss, one round and residual boosting, null-space projection, the continual loop
(docs/brainstacks.md §3–5)."""
