"""The runtime's batch cache: every row at its own length, rolled back by a number.

mlx-lm's batch caches keep all rows at one length (left padding), so one row
cannot roll back while the next goes on, which is what block diffusion and
self-speculation do at every step. Here row b's tokens sit at positions
``0 .. lengths[b] - 1`` of per-layer KV buffers [rows, heads, capacity, dim]: a
forward writes each row's new keys at its own length (one scatter, or a slice
update when the rows are in step), attends under a per-row mask, and keeps any
prefix of what it wrote (``commit``). Positions are global and the keys carry
their RoPE, so what is past a row's length is never read, only overwritten.

Canon state is as small as the convs need: each row keeps the last K-1 inputs
of every canon site (its tail), taken at ``commit`` from the forward's own
inputs, so decoding never reads back what it wrote. The inputs themselves are
not stored (they were 10x the KV); instead each row keeps its tail at every
``CHECKPOINT``-th position. Cutting a row to an arbitrary length (``cut``, how
a prefix cache trims an entry) returns to the checkpoint at or before it; the
caller replays the tokens from there (``PrefixCache.take`` does), an exact,
short forward since the keys are all kept.

Every update is functional (``put_along_axis``, ``slice_update``), never an
in-place ``a[...] = b``: caches share arrays (a prefix-cache entry and the rows
started from it), and MLX writes in place only into a buffer nobody else holds.
The per-layer views implement the model's cache contract (``LayerCache`` in
``optiq_dhara.cache``); ``RowCache`` in ``optiq_dhara.runtime.contracts`` is
what the engine uses.
"""

from typing import Optional, Sequence

import mlx.core as mx

from .cache import CHECKPOINT, canon_rows, history_array

STEP = 256  # capacity grows in whole steps of positions

Tails = list[mx.array]  # one [K-1, width] array per layer


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

    def canon_history(self, zeros: mx.array) -> tuple[mx.array]:
        tail = self._owner.tails[self._index]
        return (zeros if tail is None else tail,)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        owner, i = self._owner, self._index
        owner.keys[i] = owner._write_at(owner._buffer(owner.keys, i, keys), keys)
        owner.values[i] = owner._write_at(owner._buffer(owner.values, i, values), values)
        used = owner._used
        return owner.keys[i][:, :, :used], owner.values[i][:, :, :used]

    def append_canon(self, history: tuple, inputs: tuple) -> None:
        """Keep the inputs (as they are) until ``commit`` takes the rows' tails from them."""
        self._owner._pending[self._index] = (history, inputs)


class SlotCache:
    """KV and canon state of a batch of rows, each row at its own length.

    ``lengths`` (host ints) say how many tokens of each row are held. A buffer is
    allocated on its first write, in the dtype of what the model writes.
    ``checkpoints[b]`` maps positions of row b to its tails there.
    """

    def __init__(self, model, rows: int = 1):
        self.model = model
        self.history_len = getattr(model.args, "canon_kernel", 1) - 1  # 0: no Canon state
        self.lengths: list[int] = [0] * rows
        self.phases: list[int] = [0] * rows  # where each row's block grid starts (prepare)
        self.capacity = 0
        count = model.args.num_hidden_layers
        self.keys: list[Optional[mx.array]] = [None] * count
        self.values: list[Optional[mx.array]] = [None] * count
        self.tails: list[Optional[mx.array]] = [None] * count
        self.checkpoints: list[dict[int, Tails]] = [{} for _ in range(rows)]
        self.layers = [SlotLayer(self, i) for i in range(count)]
        self._pending: list[Optional[tuple[tuple, tuple]]] = [None] * count  # (history, inputs)
        self._offsets = mx.array(self.lengths)
        self._write: Optional[mx.array] = None
        self._start: Optional[int] = None  # where every row writes, if all write at one place
        self._used = 0

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def state(self) -> list[mx.array]:
        """Every array of the cache (to evaluate it)."""
        arrays = self.keys + self.values + self.tails
        arrays += [t for row in self.checkpoints for tails in row.values() for t in tails]
        return [a for a in arrays if a is not None]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state())

    def _buffer(self, arrays: list, i: int, like: mx.array) -> mx.array:
        """The KV buffer ``arrays[i]``, zeros shaped after ``like`` on its first use."""
        if arrays[i] is None:
            rows, heads, _, dim = like.shape
            arrays[i] = mx.zeros((self.rows, heads, self.capacity, dim), like.dtype)
        return arrays[i]

    # -- forwards ------------------------------------------------------------

    def prepare(self, length: int, real: Sequence[int], grids: Sequence[int]) -> mx.array:
        """Get ready for a forward of ``length`` positions a row; the attention mask.

        Row b's queries are its positions ``lengths[b] ..``; its first ``real[b]``
        are tokens, the rest padding. ``grids[b]`` is the row's block length
        (1 for causal): a real query at p sees key j iff ``(j + f) // g <= (p + f) // g``
        (f the row's ``phases[b]``, 0 unless its blocks start elsewhere than at 0) and
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
        if any(self.phases):
            phase = mx.array(self.phases)[:, None, None, None]
            seen = ((keys + phase) // grid <= (queries + phase) // grid) & (keys < ends)
        else:
            seen = (keys // grid <= queries // grid) & (keys < ends)
        return mx.where(queries >= ends, keys <= queries, seen)

    def _write_at(self, buffer: mx.array, update: mx.array) -> mx.array:
        """``buffer`` with each row's ``update`` [rows, heads, L, dim] written from
        the row's length on: a slice update when the rows are in step, else a scatter."""
        if self._start is not None:
            return mx.slice_update(buffer, update, mx.array([self._start]), axes=(2,))
        index = mx.broadcast_to(self._write[:, None, :, None], update.shape)
        return mx.put_along_axis(buffer, index, update, axis=2)

    def commit(self, lengths: Sequence[int]) -> None:
        """After a forward: the rows hold ``lengths`` tokens (at least what they held
        before it, at most that plus what it wrote); their tails follow, and the
        tails at the checkpoints passed on the way are kept.

        A tail is a new array of K-1 rows, cut from the forward's inputs before they
        are joined: it holds none of their buffers (a prefill's inputs are far larger
        than the tails, and are freed once evaluated)."""
        old, new = self.lengths, list(lengths)
        if self.history_len and self._pending[0] is not None:
            shifts = {n - o for n, o in zip(new, old)}
            if len(shifts) > 1:
                index = mx.array(new) - self._offsets
                index = index[:, None, None] + mx.arange(self.history_len)[:, None]
                self.tails = [
                    mx.take_along_axis(history_array((*history, inputs)), index, axis=1)
                    for history, inputs in self._pending
                ]
            elif shifts != {0}:  # (a forward whose tokens all rows drop leaves the tails)
                shift = shifts.pop()
                self.tails = [self._canon_rows(pending, shift) for pending in self._pending]
            self._checkpoint(old, new)
        self._pending = [None] * len(self._pending)
        self.lengths = new
        self._offsets = mx.array(new)

    def _canon_rows(self, pending: tuple, shift: int, row: Optional[int] = None) -> mx.array:
        """Rows ``shift .. shift+K-2`` of one layer's canon inputs before and in the last
        forward (of row ``row`` alone, if given): each row's tail after it kept ``shift``
        of the forward's tokens."""
        history, inputs = pending
        if row is not None:
            history = tuple(h[row : row + 1] for h in history)
            inputs = tuple(x[row : row + 1] for x in inputs)
        return canon_rows((*history, inputs), shift, shift + self.history_len)

    def _checkpoint(self, old: list[int], new: list[int]) -> None:
        """Keep each row's tails at the multiples of CHECKPOINT in (old, new]."""
        for b, (start, end) in enumerate(zip(old, new)):
            first = start // CHECKPOINT * CHECKPOINT + CHECKPOINT
            for position in range(first, end + 1, CHECKPOINT):
                tails = [self._canon_rows(p, position - start, b)[0] for p in self._pending]
                mx.async_eval(tails)
                self.checkpoints[b][position] = tails

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new = _round_up(needed)
        for arrays in (self.keys, self.values):
            for i, a in enumerate(arrays):
                if a is not None:
                    rows, heads, capacity, dim = a.shape
                    grow = mx.zeros((rows, heads, new - capacity, dim), a.dtype)
                    arrays[i] = mx.concatenate([a, grow], axis=2)
        self.capacity = new

    # -- rows joining, leaving, cut back --------------------------------------

    def add_rows(self, count: int) -> None:
        """``count`` empty rows at the end."""
        for arrays in (self.keys, self.values, self.tails):
            for i, a in enumerate(arrays):
                if a is not None:
                    arrays[i] = mx.concatenate([a, mx.zeros((count, *a.shape[1:]), a.dtype)])
        self.lengths = self.lengths + [0] * count
        self.phases = self.phases + [0] * count
        self.checkpoints = self.checkpoints + [{} for _ in range(count)]
        self._offsets = mx.array(self.lengths)

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep only ``rows``, in that order (a copy of what is kept)."""
        index = mx.array(list(rows), mx.int32)
        for arrays in (self.keys, self.values, self.tails):
            for i, a in enumerate(arrays):
                if a is not None:
                    arrays[i] = a[index]
        self.lengths = [self.lengths[r] for r in rows]
        self.phases = [self.phases[r] for r in rows]
        self.checkpoints = [self.checkpoints[r] for r in rows]
        self._offsets = mx.array(self.lengths)

    def put_row(self, row: int, source: "SlotCache", source_row: int = 0) -> None:
        """Row ``row`` takes the state of ``source``'s row ``source_row`` (copied in)."""
        length = source.lengths[source_row]
        self._reserve(length)
        for mine, theirs in ((self.keys, source.keys), (self.values, source.values)):
            for i, a in enumerate(theirs):
                if a is not None:
                    target = self._buffer(mine, i, a)
                    part = a[source_row : source_row + 1, :, :length]
                    mine[i] = mx.slice_update(target, part, mx.array([row, 0]), axes=(0, 2))
        for i, tail in enumerate(source.tails):
            if tail is not None:
                if self.tails[i] is None:
                    self.tails[i] = mx.zeros((self.rows, *tail.shape[1:]), tail.dtype)
                part = tail[source_row : source_row + 1]
                self.tails[i] = mx.slice_update(self.tails[i], part, mx.array([row]), (0,))
        self.lengths[row] = length
        self.phases[row] = source.phases[source_row]
        self.checkpoints[row] = dict(source.checkpoints[source_row])
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
        out = type(self)(self.model)
        length = self.lengths[row]
        out.lengths, out.capacity = [length], _round_up(length)
        out.phases = [self.phases[row]]

        def copy(a: Optional[mx.array]) -> Optional[mx.array]:
            if a is None:
                return None
            part = a[row : row + 1, :, :length] * 1  # "* 1": a new buffer, exactly equal
            rows, heads, _, dim = part.shape
            pad = mx.zeros((rows, heads, out.capacity - length, dim), a.dtype)
            return mx.concatenate([part, pad], axis=2)

        out.keys = [copy(a) for a in self.keys]
        out.values = [copy(a) for a in self.values]
        out.tails = [None if t is None else t[row : row + 1] * 1 for t in self.tails]
        out.checkpoints = [dict(self.checkpoints[row])]
        out._offsets = mx.array(out.lengths)
        mx.eval(out.state())
        return out

    def clone(self) -> "SlotCache":
        """A cache with the same state that can be changed without changing this one
        (the arrays are shared: MLX copies a buffer before writing into a shared one)."""
        out = type(self)(self.model, self.rows)
        out.lengths, out.capacity = list(self.lengths), self.capacity
        out.phases = list(self.phases)
        out.keys, out.values, out.tails = list(self.keys), list(self.values), list(self.tails)
        out.checkpoints = [dict(c) for c in self.checkpoints]
        out._offsets = mx.array(out.lengths)
        return out

    def feed(self, tokens: Sequence[int], grid: int = 1) -> None:
        """Append ``tokens`` to a one-row cache (causal, or under the block grid ``grid``)."""
        if tokens:
            mask = self.prepare(len(tokens), [len(tokens)], [grid])
            self.model.model(mx.array([list(tokens)]), cache=self.layers, mask=mask)
            self.commit([self.lengths[0] + len(tokens)])
            mx.eval(self.state())

    def cut(self, row: int, length: int) -> int:
        """Roll row ``row`` back to the last checkpoint at or before ``length`` (0 at
        the latest); the length it now holds. Replaying the tokens from there up to
        ``length`` gives the row's exact state at ``length``."""
        if length >= self.lengths[row]:
            return self.lengths[row]
        held = self.checkpoints[row]
        position = max([p for p in held if p <= length], default=0)
        self.checkpoints[row] = {p: t for p, t in held.items() if p <= position}
        self.lengths[row] = position
        self._offsets = mx.array(self.lengths)
        chosen = mx.arange(self.rows)[:, None, None] == row
        for i, tail in enumerate(self.tails):
            if tail is not None:
                at = held[position][i] if position else mx.zeros(tail.shape[1:], tail.dtype)
                self.tails[i] = mx.where(chosen, at[None], tail)
        return position


def row_cache(model, rows: int = 1):
    """An empty runtime cache of ``rows`` rows for ``model``: the model's own kind
    (``model.row_cache``, as arcLM has), else a SlotCache."""
    make = getattr(model, "row_cache", None)
    return make(rows) if make is not None else SlotCache(model, rows)
