"""Evaluation: perplexity, benchmark tasks (lm-eval YAML subset), metrics, pairwise comparison."""
