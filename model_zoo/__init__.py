"""Flax NNX models for serving, weight loaders and the architecture registry (never imports serving)."""
