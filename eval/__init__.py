"""Evaluation: perplexity / bits per byte, lm-evaluation-harness tasks, side-by-side reports, model cards."""
