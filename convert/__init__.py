"""Hugging Face dhara checkpoints to MLX directories, with mixed-precision quantization."""

from .pipeline import convert

__all__ = ["convert"]
