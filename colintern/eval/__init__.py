"""Evaluation: the job (run), mteb's encoder wrapper and model meta, local BEIR tasks and unrounded metrics."""
