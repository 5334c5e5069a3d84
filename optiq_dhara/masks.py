"""Attention masks over global positions, shared by decoding, training and evaluation.

All masks are bool (True = may attend), so they work with every weight format.
"""

import mlx.core as mx


def block_causal_mask(length: int, block_len: int, offset: int = 0) -> mx.array:
    """[length, offset + length]: query p sees key j iff j // B <= p // B.

    Queries are the global positions ``offset .. offset + length - 1``; keys are
    every position from 0 (a cached prefix of ``offset`` tokens, then the queries).
    """
    if block_len < 1:
        raise ValueError(f"block_len must be >= 1, got {block_len}")
    queries = mx.arange(offset, offset + length)
    keys = mx.arange(offset + length)
    return (keys[None, :] // block_len) <= (queries[:, None] // block_len)


def causal_mask(length: int, offset: int = 0) -> mx.array:
    """[length, offset + length]: query p sees key j iff j <= p."""
    queries = mx.arange(offset, offset + length)
    keys = mx.arange(offset + length)
    return keys[None, :] <= queries[:, None]
