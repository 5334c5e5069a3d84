"""The runtime's batch cache: every row at its own length, rolled back by a number.

mlx-lm's batch caches keep all rows at one length (left padding), so one row
cannot roll back while the next goes on, which is what block diffusion and
self-speculation do at every step. Here row b's tokens sit at positions
``0 .. lengths[b] - 1`` of per-layer buffers [rows, ..., capacity, ...]: a
forward writes each row's new tokens at its own length (one scatter a buffer),
attends under a per-row mask, and rolling a row back is lowering its length.
Positions are global and the keys carry their RoPE, so what is past a row's
length is never read, only overwritten later.

Every update is functional (``put_along_axis``, ``slice_update``), never an
in-place ``a[...] = b``: caches share arrays (a prefix-cache entry and the rows
started from it), and MLX writes in place only into a buffer nobody else holds.

Canon state: every canon input is written to a store (read only to rebuild a
tail when a row is cut back to an arbitrary length), and each row keeps the
last K-1 inputs as a small tail that the next forward reads. ``commit`` sets the
rows' new lengths after a forward and takes their tails from that forward's own
inputs, so decoding never reads a buffer in the graph that writes it (which
would make MLX copy the buffer).

The per-layer views implement the model's cache contract (``LayerCache`` in
``optiq_dhara.cache``); ``forward`` runs the model over the rows.
"""

from typing import Optional, Sequence

import mlx.core as mx

STEP = 256  # capacity grows in whole steps of positions


def _round_up(n: int) -> int:
    return (n + STEP - 1) // STEP * STEP


class SlotLayer:
    """One layer's view of a ``SlotCache``: what the model's layers call."""

    def __init__(self, owner: "SlotCache", index: int):
        self._owner, self._index = owner, index

    @property
    def offset(self) -> mx.array:
        return self._owner._offsets

    @property
    def kv(self) -> "SlotLayer":
        """The attention cache handed to ``scaled_dot_product_attention`` (never quantized)."""
        return self

    def canon_valid(self, length: int, new: int) -> None:
        """Positions before a row's first token are zeros in its tail already."""
        return None

    def canon_history(self, zeros: mx.array) -> mx.array:
        tail = self._owner.tails[self._index]
        return zeros if tail is None else tail

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        owner, i = self._owner, self._index
        owner.keys[i] = owner._write_at(owner._buffer(owner.keys, i, keys, 2), keys, 2)
        owner.values[i] = owner._write_at(owner._buffer(owner.values, i, values, 2), values, 2)
        used = owner._used
        return owner.keys[i][:, :, :used], owner.values[i][:, :, :used]

    def append_canon(self, history: mx.array, inputs: mx.array) -> mx.array:
        owner, i = self._owner, self._index
        owner._pending[i] = (history, inputs)
        if inputs.shape[-1] == 0:
            return inputs
        store = owner._buffer(owner.canon, i, inputs, 1)
        owner.canon[i] = owner._write_at(store, inputs, 1)
        return owner.canon[i]


# The buffers of a layer and the axis along which positions run.
_POSITION_AXIS = {"keys": 2, "values": 2, "canon": 1}


class SlotCache:
    """KV and canon state of a batch of rows, each row at its own length.

    ``lengths`` (host ints) say how many tokens of each row are held. A buffer is
    allocated on its first write, in the dtype of what the model writes.
    """

    def __init__(self, model, rows: int = 1):
        self.model = model
        self.history_len = model.args.canon_kernel - 1
        self.lengths: list[int] = [0] * rows
        self.capacity = 0
        count = model.args.num_hidden_layers
        self.keys: list[Optional[mx.array]] = [None] * count
        self.values: list[Optional[mx.array]] = [None] * count
        self.canon: list[Optional[mx.array]] = [None] * count
        self.tails: list[Optional[mx.array]] = [None] * count
        self.layers = [SlotLayer(self, i) for i in range(count)]
        self._pending: list[Optional[tuple[mx.array, mx.array]]] = [None] * count
        self._offsets = mx.array(self.lengths)
        self._write: Optional[mx.array] = None
        self._start: Optional[int] = (
            None  # where every row writes, when they all write at one place
        )
        self._used = 0

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def _buffers(self):
        return {"keys": self.keys, "values": self.values, "canon": self.canon}

    def state(self) -> list[mx.array]:
        """Every array of the cache (to evaluate it)."""
        arrays = self.keys + self.values + self.canon + self.tails
        return [a for a in arrays if a is not None]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state())

    def _buffer(self, arrays: list, i: int, like: mx.array, axis: int) -> mx.array:
        """The buffer ``arrays[i]``, zeros shaped after ``like`` on its first use."""
        if arrays[i] is None:
            shape = list(like.shape)
            shape[0], shape[axis] = self.rows, self.capacity
            arrays[i] = mx.zeros(shape, like.dtype)
        return arrays[i]

    # -- forwards ------------------------------------------------------------

    def prepare(self, length: int, real: Sequence[int], grids: Sequence[int]) -> mx.array:
        """Get ready for a forward of ``length`` positions a row; the attention mask.

        Row b's queries are its positions ``lengths[b] ..``; its first ``real[b]``
        are tokens, the rest padding. ``grids[b]`` is the row's block length
        (1 for causal): a real query at p sees key j iff ``j // g <= p // g`` and
        j is one of the row's tokens; a padding query sees the keys up to itself,
        so that it never attends to nothing.
        """
        self._reserve(max(self.lengths) + length)
        starts = mx.array(self.lengths)
        self._offsets = starts
        self._write = starts[:, None] + mx.arange(length)
        self._start = self.lengths[0] if len(set(self.lengths)) == 1 else None
        self._used = max(self.lengths) + length
        queries = self._write[:, None, :, None]
        keys = mx.arange(self._used)
        grid = mx.array(list(grids))[:, None, None, None]
        ends = (starts + mx.array(list(real)))[:, None, None, None]
        seen = (keys // grid <= queries // grid) & (keys < ends)
        return mx.where(queries >= ends, keys <= queries, seen)

    def _write_at(self, buffer: mx.array, update: mx.array, axis: int) -> mx.array:
        """``buffer`` with each row's ``update`` written from the row's length on.

        A slice update when every row starts at the same position (one row, or
        rows in step), else one scatter.
        """
        if self._start is not None:
            start = mx.array([self._start])
            return mx.slice_update(buffer, update, start, axes=(axis,))
        shape = [update.shape[0]] + [1] * (update.ndim - 1)
        shape[axis] = update.shape[axis]
        index = mx.broadcast_to(self._write.reshape(shape), update.shape)
        return mx.put_along_axis(buffer, index, update, axis=axis)

    def commit(self, lengths: Sequence[int]) -> None:
        """After a forward: the rows hold ``lengths`` tokens (at least what they held
        before it, at most that plus what it wrote); their tails follow."""
        new = mx.array(list(lengths))
        if self.history_len and self._pending[0] is not None:
            shifts = {n - old for n, old in zip(lengths, self.lengths)}
            shift = shifts.pop() if len(shifts) == 1 else None
            index = (new - self._offsets)[:, None, None] + mx.arange(self.history_len)[:, None]
            for i, (history, inputs) in enumerate(self._pending):
                both = mx.concatenate([history, inputs], axis=1)
                if shift is not None:
                    self.tails[i] = both[:, shift : shift + self.history_len]
                else:
                    self.tails[i] = mx.take_along_axis(both, index, axis=1)
        self._pending = [None] * len(self._pending)
        self.lengths = list(lengths)
        self._offsets = new

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new = _round_up(needed)
        for name, arrays in self._buffers().items():
            axis = _POSITION_AXIS[name]
            for i, a in enumerate(arrays):
                if a is not None:
                    shape = list(a.shape)
                    shape[axis] = new - self.capacity
                    arrays[i] = mx.concatenate([a, mx.zeros(shape, a.dtype)], axis=axis)
        self.capacity = new

    # -- rows joining, leaving, cut back --------------------------------------

    def add_rows(self, count: int) -> None:
        """``count`` empty rows at the end."""
        for arrays in (self.keys, self.values, self.canon, self.tails):
            for i, a in enumerate(arrays):
                if a is not None:
                    arrays[i] = mx.concatenate([a, mx.zeros((count, *a.shape[1:]), a.dtype)])
        self.lengths = self.lengths + [0] * count
        self._offsets = mx.array(self.lengths)

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep only ``rows``, in that order (a copy of what is kept)."""
        index = mx.array(list(rows), mx.int32)
        for arrays in (self.keys, self.values, self.canon, self.tails):
            for i, a in enumerate(arrays):
                if a is not None:
                    arrays[i] = a[index]
        self.lengths = [self.lengths[r] for r in rows]
        self._offsets = mx.array(self.lengths)

    def put_row(self, row: int, source: "SlotCache", source_row: int = 0) -> None:
        """Row ``row`` takes the state of ``source``'s row ``source_row`` (copied in)."""
        length = source.lengths[source_row]
        self._reserve(length)
        take = slice(source_row, source_row + 1)
        for name, theirs in source._buffers().items():
            mine, axis = self._buffers()[name], _POSITION_AXIS[name]
            for i, a in enumerate(theirs):
                if a is None:
                    continue
                target = self._buffer(mine, i, a, axis)
                span = (slice(None),) * (axis - 1) + (slice(0, length),)
                start = mx.array([row, 0])
                mine[i] = mx.slice_update(target, a[(take,) + span], start, axes=(0, axis))
        for i, tail in enumerate(source.tails):
            if tail is not None:
                if self.tails[i] is None:
                    self.tails[i] = mx.zeros((self.rows, *tail.shape[1:]), tail.dtype)
                self.tails[i] = mx.slice_update(self.tails[i], tail[take], mx.array([row]), (0,))
        self.lengths[row] = length
        self._offsets = mx.array(self.lengths)

    @classmethod
    def stack(cls, caches: Sequence["SlotCache"]) -> "SlotCache":
        """One cache whose row i is a copy of the single row of ``caches[i]``."""
        out = cls(caches[0].model, rows=len(caches))
        for i, cache in enumerate(caches):
            out.put_row(i, cache)
        return out

    def take_row(self, row: int) -> "SlotCache":
        """A one-row cache with a copy of row ``row``'s state, evaluated and sharing
        no buffer with this cache (so that this one stays writable in place)."""
        out = SlotCache(self.model)
        length = self.lengths[row]
        out.lengths, out.capacity = [length], _round_up(length)

        def copy(a: Optional[mx.array], axis: int) -> Optional[mx.array]:
            if a is None:
                return None
            span = (slice(None),) * (axis - 1) + (slice(0, length),)
            part = a[(slice(row, row + 1),) + span] * 1  # "* 1": a new buffer, exactly equal
            shape = list(part.shape)
            shape[axis] = out.capacity - length
            return mx.concatenate([part, mx.zeros(shape, a.dtype)], axis=axis)

        out.keys = [copy(a, 2) for a in self.keys]
        out.values = [copy(a, 2) for a in self.values]
        out.canon = [copy(a, 1) for a in self.canon]
        out.tails = [None if t is None else t[row : row + 1] * 1 for t in self.tails]
        out._offsets = mx.array(out.lengths)
        mx.eval(out.state())
        return out

    def clone(self) -> "SlotCache":
        """A cache with the same state that can be changed without changing this one
        (the arrays are shared: MLX copies a buffer before writing into a shared one)."""
        out = SlotCache(self.model, self.rows)
        out.lengths, out.capacity = list(self.lengths), self.capacity
        out.keys, out.values = list(self.keys), list(self.values)
        out.canon, out.tails = list(self.canon), list(self.tails)
        out._offsets = mx.array(out.lengths)
        return out

    def cut(self, row: int, length: int) -> None:
        """Roll row ``row`` back to its first ``length`` tokens (any depth)."""
        if length >= self.lengths[row]:
            return
        self.lengths[row] = length
        self._offsets = mx.array(self.lengths)
        if self.history_len and self.canon[0] is not None:
            positions = mx.arange(length - self.history_len, length)
            chosen = mx.arange(self.rows)[:, None, None] == row
            for i, store in enumerate(self.canon):
                tail = store[row, mx.maximum(positions, 0)]
                tail = mx.where((positions >= 0)[:, None], tail, 0)
                self.tails[i] = mx.where(chosen, tail[None], self.tails[i])
            mx.eval(self.tails)
