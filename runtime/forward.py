"""Model calls on a prefix cache: prefill, one forward, rollback.

Every forward with a cache appends its tokens' KV and canon inputs; rolling back
is trimming (``DharaCache`` trims KV and canon state together, exactly).
"""

from typing import Optional, Sequence

import mlx.core as mx

from ..cache import trim_layers
from ..masks import block_causal_mask

PREFILL_STEP = 2048


def cache_length(cache: list) -> int:
    return cache[0].offset


def forward(model, cache: list, tokens: Sequence[int], block_len: Optional[int] = None) -> mx.array:
    """Logits [L, vocab] of ``tokens`` appended to the cache.

    Causal, or block-causal over global positions when ``block_len`` is given.
    """
    mask = None
    if block_len is not None:
        mask = block_causal_mask(len(tokens), block_len, cache_length(cache))
    return model(mx.array([list(tokens)]), cache=cache, mask=mask)[0]


def rollback(cache: list, length: int) -> None:
    """Trim the cache back to its first ``length`` tokens."""
    excess = cache_length(cache) - length
    if excess > 0:
        trim_layers(cache, excess)


def prefill(model, cache: list, tokens: Sequence[int], block_len: Optional[int] = None) -> None:
    """Feed ``tokens`` into the cache in chunks, computing no logits.

    Not counted in ``Stats.forwards``, which counts the forwards that decode.

    Under the block grid, chunks are whole blocks, so that no query misses a key
    of its own block.
    """
    step = PREFILL_STEP
    if block_len is not None:
        step = max(block_len, PREFILL_STEP // block_len * block_len)
    for start in range(0, len(tokens), step):
        forward(model, cache, tokens[start : start + step], block_len)
        mx.eval([c.state for c in cache])
