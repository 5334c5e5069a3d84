"""The per-layer cache of dhara: attention KV plus the history of every canon input.

The canon inputs are kept in a second, KV-shaped store (their concatenation as its
keys, zero-width values) of the same stock mlx-lm class as the attention cache.
Everything mlx-lm does to a cache along the sequence axis (trim, save/load,
merging into a batch, left and right padding, filtering) therefore moves the
canon state together with the keys and values, exactly.
"""

from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import CacheList, KVCache


class DharaCache(CacheList):
    """KV cache and canon-input store of one decoder layer."""

    def __init__(self, kv: Optional[object] = None, canon: Optional[object] = None):
        super().__init__(
            kv if kv is not None else KVCache(), canon if canon is not None else KVCache()
        )

    @property
    def kv(self):
        return self.caches[0]

    @property
    def canon(self):
        return self.caches[1]

    @property
    def offset(self):
        return self.kv.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        return self.kv.update_and_fetch(keys, values)

    def make_mask(self, *args, **kwargs):
        return self.kv.make_mask(*args, **kwargs)

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> "DharaCache":
        """Quantize the keys and values; the canon history stays in float."""
        if not hasattr(self.kv, "to_quantized"):
            return self
        return DharaCache(self.kv.to_quantized(group_size=group_size, bits=bits), self.canon)

    def extract(self, idx: int) -> "DharaCache":
        return DharaCache(self.kv.extract(idx), self.canon.extract(idx))

    def canon_history(self, length: int, width: int, dtype: mx.Dtype) -> mx.array:
        """The last ``length`` canon inputs [B, length, width], zeros before the start."""
        if self.canon.empty() or self.canon.size() == 0:
            batch = self.kv.offset.size if isinstance(self.kv.offset, mx.array) else 1
            return mx.zeros((batch, length, width), dtype)
        stored, _ = self.canon.keys_and_values()
        history = stored[:, 0, -length:, :]
        missing = length - history.shape[1]
        if missing > 0:
            history = mx.pad(history, [(0, 0), (missing, 0), (0, 0)])
        return history

    def canon_valid(self, length: int, new: int) -> Optional[mx.array]:
        """[B, length + new, 1]: which of the history and new rows are real tokens.

        None unless the store is a batch with left padding, whose padded rows must
        read as zeros in the convs.
        """
        left_padding = getattr(self.canon, "left_padding", None)
        if left_padding is None:
            return None
        start = self.canon.size()
        positions = mx.arange(start - length, start + new)
        return (positions[None, :] >= left_padding[:, None])[..., None]

    def append_canon(self, inputs: mx.array):
        """Store the canon inputs [B, L, width] of the tokens just processed."""
        empty = mx.zeros((*inputs.shape[:2], 0), inputs.dtype)
        self.canon.update_and_fetch(inputs[:, None], empty[:, None])
