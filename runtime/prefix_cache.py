"""Caches kept across requests, so a new prompt skips the prefix it shares with an earlier one.

Causal modes (AR, spec) share one kind of state; block diffusion's KV, computed
under the block grid, is another (per block length) and is only reusable in
whole global blocks. Reuse never changes the output: the reused part is exactly
what a fresh prefill would put there.
"""

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

from ..slot_cache import SlotCache, row_cache

DEFAULT_BYTES = 1 << 30


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(eq=False)
class Entry:
    """The one-row cache of an ended request and the tokens it holds."""

    model: object
    tokens: list[int]
    grid: Optional[int]
    cache: SlotCache
    nbytes: int


class PrefixCache:
    """The states of recent requests, least recently used dropped first.

    ``take`` hands a decoding row a copy of the best entry's state (trimmed to
    the reusable prefix: back to the canon checkpoint at or before it, then the
    tokens from there replayed, at most ``CHECKPOINT - 1``); entries are never
    changed by the rows that use them, so several rows can start from one.
    ``keep`` stores a row's state when it ends. At most ``max_bytes`` of state
    are held. Not thread-safe.
    """

    def __init__(self, max_bytes: int = DEFAULT_BYTES):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}.")
        self.max_bytes = max_bytes
        self._entries: "OrderedDict[int, Entry]" = OrderedDict()

    @property
    def tokens(self) -> list[int]:
        """The token ids of the most recently used entry ([] when empty)."""
        if not self._entries:
            return []
        return list(next(reversed(self._entries.values())).tokens)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, model, prompt: Sequence[int], grid: Optional[int]) -> SlotCache:
        """A one-row cache for ``prompt`` holding the longest reusable prefix of it.

        ``grid`` is None for causal decoding, the block length for diffusion.
        At least the last prompt token is left to compute (its logits start
        decoding); under a grid, only whole blocks of the prompt are kept.
        """
        usable = len(prompt) - 1 if grid is None else len(prompt) // grid * grid
        best, keep = None, 0
        for entry in self._entries.values():
            if entry.model is model and entry.grid == grid:
                n = min(shared_prefix(entry.tokens, prompt), usable)
                if grid is not None:
                    n = n // grid * grid
                if n > keep:
                    best, keep = entry, n
        if best is None:
            return row_cache(model)
        self._entries.move_to_end(id(best))
        cache = best.cache.clone()
        held = cache.cut(0, keep)
        cache.feed(best.tokens[held:keep], grid or 1)  # from the checkpoint to the cut
        return cache

    def keep(self, cache: SlotCache, seq: Sequence[int], grid: Optional[int]) -> None:
        """Hold ``cache`` (one row, whose first tokens are ``seq``'s) for later requests."""
        length = cache.cut(0, len(seq))
        if length == 0:
            return
        tokens = list(seq[:length])
        model = cache.model
        for key, entry in list(self._entries.items()):  # an entry this one extends is redundant
            same_kind = entry.model is model and entry.grid == grid
            if same_kind and tokens[: len(entry.tokens)] == entry.tokens:
                del self._entries[key]
        entry = Entry(model, tokens, grid, cache, cache.nbytes())
        self._entries[id(entry)] = entry
        while self._entries and self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
