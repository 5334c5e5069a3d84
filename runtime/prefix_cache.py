"""A cache kept across requests, so a new prompt skips the prefix it shares with the last.

Causal modes (AR, spec) share one kind of state; block diffusion's KV, computed
under the block grid, is another (per block length) and is only reusable in
whole global blocks. Reuse never changes the output: the reused part is exactly
what a fresh prefill would put there.
"""

from typing import Optional, Sequence

from .forward import cache_length, rollback


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """The KV and canon state of the last request, and the tokens it holds.

    ``take`` hands the state (trimmed to the reusable prefix) to a decoding
    run, which gives it back with ``keep`` when it ends. Not thread-safe: one
    run at a time.
    """

    def __init__(self):
        self._model = None
        self._cache: Optional[list] = None
        self._tokens: list[int] = []
        self._grid: Optional[int] = None

    @property
    def tokens(self) -> list[int]:
        """The token ids whose state is held."""
        return list(self._tokens)

    def take(self, model, prompt: Sequence[int], grid: Optional[int]) -> list:
        """A cache for ``prompt`` holding the longest reusable prefix of it.

        ``grid`` is None for causal decoding, the block length for diffusion.
        At least the last prompt token is left to compute (its logits start
        decoding); under a grid, only whole blocks of the prompt are kept.
        """
        cache, held = self._cache, self._tokens
        self._cache, self._tokens = None, []
        if cache is None or self._model is not model or self._grid != grid:
            return model.make_cache()
        usable = len(prompt) - 1 if grid is None else len(prompt) // grid * grid
        keep = min(shared_prefix(held, prompt), usable)
        if grid is not None:
            keep = keep // grid * grid
        rollback(cache, keep)
        return cache

    def keep(self, model, cache: list, seq: Sequence[int], grid: Optional[int]) -> None:
        """Hold ``cache``, whose first tokens are ``seq``'s, for the next request."""
        rollback(cache, len(seq))
        self._model, self._cache, self._grid = model, cache, grid
        self._tokens = list(seq[: cache_length(cache)])

    def clear(self) -> None:
        """Forget the held state."""
        self._model, self._cache, self._tokens, self._grid = None, None, [], None
