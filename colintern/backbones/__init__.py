"""Backbone families: one module per family (InternVL3.5, Qwen3-VL) behind the registry, their processors, and the generation sanity check."""
