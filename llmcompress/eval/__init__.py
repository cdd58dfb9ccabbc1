"""Evaluation: lm-eval harness tasks, perplexity and KL divergence against the original model."""
