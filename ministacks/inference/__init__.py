"""A model with its stacks and router, answering prompts in base, ungated, routed mode or with given weights."""
