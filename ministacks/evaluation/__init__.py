"""What an answer is worth: the checks per domain, HumanEval pass@1, and the sandbox that runs model-written code."""
