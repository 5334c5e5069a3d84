"""The runtime cache of arcLM: per-row KV for the attention layers, and the Gated
DeltaNet layers' recurrent state, kept or restored whole at each commit.

The attention layers' KV is the ``SlotCache``'s (every row at its own length, a
block grid per row). A recurrent state cannot be rolled back to an arbitrary
length, and BD3LM never needs that: a denoising step runs a block and keeps none
of it, the forward that commits a finished block keeps all of it. So ``prepare``
snapshots each GDN layer's state (conv tail and delta-rule state, [rows, ...])
and ``commit`` keeps, row by row, either everything the forward wrote or
nothing; any other length is refused. The snapshot is a reference, not a copy:
MLX arrays are immutable and the forward makes new ones.
"""

from typing import Optional, Sequence

import mlx.core as mx

from optiq_dhara.slot_cache import SlotCache, SlotLayer


class RecurrentLayer:
    """A Gated DeltaNet layer's view of an ``ArcCache``: what mlx-lm's GatedDeltaNet
    reads and writes (``cache[0]`` the conv tail, ``cache[1]`` the state,
    ``lengths`` each row's real tokens in the forward)."""

    def __init__(self, owner: "ArcCache", index: int):
        self._owner, self._index = owner, index

    def __getitem__(self, i: int) -> Optional[mx.array]:
        state = self._owner.recurrent[self._index]
        return None if state is None else state[i]

    def __setitem__(self, i: int, value: mx.array) -> None:
        owner = self._owner
        if owner.recurrent[self._index] is None:
            owner.recurrent[self._index] = [None, None]
        owner.recurrent[self._index][i] = value

    @property
    def lengths(self) -> Optional[mx.array]:
        return self._owner._real

    def advance(self, count: int) -> None:
        return None  # lengths are the owner's, committed by the runtime

    def make_mask(self, length: int) -> Optional[mx.array]:
        """[rows, length] which positions of the forward are tokens (None: all); the
        name is mlx-lm's ArraysCache's."""
        real = self._owner._real
        return None if real is None else mx.arange(length) < real[:, None]


class ArcCache(SlotCache):
    """``SlotCache`` plus the recurrent state of every Gated DeltaNet layer."""

    def __init__(self, model, rows: int = 1):
        super().__init__(model, rows)
        self.layers = [
            RecurrentLayer(self, i) if layer.is_linear else SlotLayer(self, i)
            for i, layer in enumerate(model.layers)
        ]
        self.recurrent: list[Optional[list]] = [None] * len(self.layers)
        self._snapshot: list[Optional[list]] = self.recurrent
        self._real: Optional[mx.array] = None
        self._written: list[int] = [0] * rows

    def state(self) -> list[mx.array]:
        arrays = [a for layer in self.recurrent if layer is not None for a in layer]
        return super().state() + [a for a in arrays if a is not None]

    def prepare(self, length: int, real: Sequence[int], grids: Sequence[int]) -> mx.array:
        self._snapshot = [None if s is None else list(s) for s in self.recurrent]
        self._written = list(real)
        self._real = None if all(r == length for r in real) else mx.array(list(real))
        return super().prepare(length, real, grids)

    def commit(self, lengths: Sequence[int]) -> None:
        """Rows keep all the forward wrote (their length grows by their real tokens)
        or none of it (their recurrent state goes back to the snapshot)."""
        kept = []
        for b, (old, new) in enumerate(zip(self.lengths, lengths)):
            if new not in (old, old + self._written[b]):
                raise ValueError(
                    f"arcLM's recurrent state keeps all of a forward or none of it: row {b} "
                    f"held {old} tokens, wrote {self._written[b]}, and {new} were asked for."
                )
            kept.append(new > old)
        if not all(kept):
            keep = mx.array(kept)
            self.recurrent = [
                _select(keep, now, before) for now, before in zip(self.recurrent, self._snapshot)
            ]
        self._real, self._written = None, [0] * self.rows
        super().commit(lengths)

    def add_rows(self, count: int) -> None:
        super().add_rows(count)
        self.recurrent = [_each(s, lambda a: _grow(a, count)) for s in self.recurrent]

    def keep_rows(self, rows: Sequence[int]) -> None:
        super().keep_rows(rows)
        index = mx.array(list(rows), mx.int32)
        self.recurrent = [_each(s, lambda a: a[index]) for s in self.recurrent]

    def put_row(self, row: int, source: "ArcCache", source_row: int = 0) -> None:
        super().put_row(row, source, source_row)
        for i, theirs in enumerate(source.recurrent):
            if theirs is None:
                continue
            if self.recurrent[i] is None:
                self.recurrent[i] = [mx.zeros((self.rows, *a.shape[1:]), a.dtype) for a in theirs]
            self.recurrent[i] = [
                mx.slice_update(mine, a[source_row : source_row + 1], mx.array([row]), (0,))
                for mine, a in zip(self.recurrent[i], theirs)
            ]

    def take_row(self, row: int) -> "ArcCache":
        out = super().take_row(row)
        out.recurrent = [_each(s, lambda a: a[row : row + 1] * 1) for s in self.recurrent]
        mx.eval(out.state())
        return out

    def clone(self) -> "ArcCache":
        out = super().clone()
        out.recurrent = [None if s is None else list(s) for s in self.recurrent]
        return out

    def cut(self, row: int, length: int) -> int:
        """A recurrent state has no checkpoints: a cut below the row's length empties it."""
        if length >= self.lengths[row]:
            return self.lengths[row]
        super().cut(row, 0)
        empty = mx.arange(self.rows) != row
        self.recurrent = [_select(empty, s, None) for s in self.recurrent]
        return 0


def _each(state: Optional[list], fn) -> Optional[list]:
    return None if state is None else [fn(a) for a in state]


def _grow(a: mx.array, count: int) -> mx.array:
    return mx.concatenate([a, mx.zeros((count, *a.shape[1:]), a.dtype)])


def _select(keep: mx.array, now: Optional[list], before: Optional[list]) -> Optional[list]:
    """Row by row, ``now``'s arrays where ``keep``, else ``before``'s (None: zeros)."""
    if now is None:
        return before
    if before is None:
        before = [mx.zeros_like(a) for a in now]
    return [mx.where(keep.reshape(-1, *[1] * (a.ndim - 1)), a, b) for a, b in zip(now, before)]
