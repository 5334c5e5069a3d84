"""The per-layer cache of dhara: attention KV plus the history of every canon input.

The canon inputs are kept in a second, KV-shaped store (their concatenation as its
keys, zero-width values) of the same stock mlx-lm class as the attention cache.
Everything mlx-lm does to a cache along the sequence axis (trim, save/load,
merging into a batch, left and right padding, filtering) therefore moves the
canon state together with the keys and values, exactly.

Decoding reads the last K-1 canon inputs at every step. Reading them out of the
store and writing the new inputs into it in the same graph would make MLX copy
the whole store on each write (a buffer that is still read cannot be updated in
place), so the cache also keeps those K-1 rows as a separate small array, the
tail. The tail is derived state: it is used only while the store is the very
array it was taken from, at the same size, and is rebuilt from the store
otherwise, so whatever mlx-lm does to the store behind its back can cost a copy
but never give a wrong answer.
"""

from typing import Optional, Protocol, Union

import mlx.core as mx
from mlx_lm.models.cache import CacheList, KVCache, trim_prompt_cache


class LayerCache(Protocol):
    """What a decoder layer asks of its cache during a forward.

    ``DharaCache`` (mlx-lm's protocol: one length for the whole batch) and the
    runtime's ``SlotLayer`` (a length per row) implement it.
    """

    @property
    def offset(self) -> Union[int, mx.array]:
        """Position of the first new token: one int, or one per row."""

    @property
    def kv(self):
        """The attention cache handed to mlx-lm's ``scaled_dot_product_attention``."""

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append the new keys/values [B, H, L, D]; every key/value the queries may see."""

    def canon_history(self, zeros: mx.array) -> mx.array:
        """The last K-1 canon inputs [B, K-1, width] before the new tokens (zeros if none)."""

    def canon_valid(self, length: int, new: int) -> Optional[mx.array]:
        """[B, length + new, 1] real-token flags of history and new rows, or None if all are."""

    def append_canon(self, history: mx.array, inputs: mx.array) -> mx.array:
        """Store the new canon inputs [B, L, width]; an array the layer output depends on."""


class DharaCache(CacheList):
    """KV cache and canon-input store of one decoder layer."""

    # Class-level defaults: ``from_state`` builds instances without ``__init__``.
    _tail: Optional[mx.array] = None
    _tail_source: Optional[mx.array] = None
    _tail_size: int = -1

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
        quantized = DharaCache(self.kv.to_quantized(group_size=group_size, bits=bits), self.canon)
        quantized._tail, quantized._tail_source = self._tail, self._tail_source
        quantized._tail_size = self._tail_size
        return quantized

    def extract(self, idx: int) -> "DharaCache":
        return DharaCache(self.kv.extract(idx), self.canon.extract(idx))

    def trim(self, n: int, evaluate: bool = True) -> int:
        """Roll KV and canon state back by ``n`` tokens; rebuild a current tail now.

        The tail must be evaluated between forwards, so that the next forward
        reads no row of the store it writes to: here, or, with ``evaluate=False``,
        by the caller, who can then evaluate every layer's tail in one go
        (``trim_layers``) instead of one synchronisation per layer.
        """
        current = self._tail_is_current()
        trimmed = super().trim(n)
        if current:
            self._set_tail(self._history_from_store(mx.zeros_like(self._tail)))
            if evaluate:
                mx.eval(self._tail)
        return trimmed

    def canon_history(self, zeros: mx.array) -> mx.array:
        """The last K-1 canon inputs [B, K-1, width]; ``zeros`` of that shape when none.

        Positions before the first token read as zeros.
        """
        if self._tail_is_current() and self._tail.shape == zeros.shape:
            return self._tail
        return self._history_from_store(zeros)

    def _tail_is_current(self) -> bool:
        """The tail was taken from the store as it is (same array, same size)."""
        store = self.canon
        return (
            self._tail is not None
            and self._tail_source is store.keys
            and self._tail_size == store.size()
        )

    def _history_from_store(self, zeros: mx.array) -> mx.array:
        """Rows of the store, always in a new buffer (never a view of the store)."""
        if self.canon.empty() or self.canon.size() == 0:
            return zeros
        stored, _ = self.canon.keys_and_values()
        length = zeros.shape[1]
        history = stored[:, 0, stored.shape[2] - min(length, stored.shape[2]) :, :]
        return mx.concatenate([zeros[:, history.shape[1] :], history], axis=1)

    def _set_tail(self, tail: mx.array):
        self._tail, self._tail_source, self._tail_size = tail, self.canon.keys, self.canon.size()

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

    def append_canon(self, history: mx.array, inputs: mx.array) -> mx.array:
        """Store the canon inputs [B, L, width] that followed ``history``.

        Returns the updated store, for the caller to make its output depend on,
        so that the write is evaluated with the forward that produced it. The
        write itself depends on the new tail, so evaluating the cache's state
        also evaluates the tail (which then stops holding ``inputs``).
        """
        length = history.shape[1]
        last = inputs[:, max(inputs.shape[1] - length, 0) :]
        tail = mx.concatenate([history, last], axis=1)
        tail = tail[:, tail.shape[1] - length :]
        rows = mx.depends(inputs, tail)[:, None]
        self.canon.update_and_fetch(rows, mx.zeros((*rows.shape[:3], 0), rows.dtype))
        self._set_tail(tail)
        return self.canon.keys


def trim_layers(cache: list, n: int) -> None:
    """Trim every layer's cache by ``n`` tokens, with one evaluation for all of them."""
    if not all(isinstance(c, DharaCache) for c in cache):
        trim_prompt_cache(cache, n)
        return
    for c in cache:
        c.trim(n, evaluate=False)
    mx.eval([c._tail for c in cache if c._tail is not None])
