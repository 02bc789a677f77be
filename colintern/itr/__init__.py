"""Seed 004, image-text retrieval: the model and heads, their losses, training, evaluation, scenes, the demo and its report."""
