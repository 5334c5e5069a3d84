"""The per-layer cache of dhara for mlx-lm: the attention KV plus a bounded canon state.

A canon conv at position t reads the canon inputs of positions t-K+1 .. t-1, so
decoding needs only the last K-1 inputs of each site. Rolling back by n tokens
needs the K-1 inputs before the new end, which are gone once they leave that
tail. The cache therefore keeps, per layer and next to a stock mlx-lm KV cache:

- the canon inputs of the last ``RECENT + K - 1`` positions (the window): a trim
  of up to ``RECENT`` tokens (speculative decoding's rejected drafts) costs
  nothing;
- the K-1 inputs before every ``CHECKPOINT``-th position of each row;
- the token ids of every position.

A deeper trim goes back to the nearest checkpoint at or before the new end and
marks the tokens from there for replay; the model's next forward first runs them
(``replay``): a short forward, since the KV is kept in full. At most
``CHECKPOINT - 1`` tokens are replayed (more only for rows of a batch whose
checkpoints sit at different places, where the replay starts at the latest
position every row can start from, at worst the first).

Positions are those of the KV buffer (mlx-lm's batch caches pad rows on the
left), so rows of a batch share them. Every operation mlx-lm performs on a
cache (trim, save/load, ``kv_bits``, merge into a batch, extend, filter,
extract, right-padded prefill and its ``finalize``) keeps the canon state exact.
"""

from dataclasses import dataclass, field
from typing import Optional, Protocol, Union

import mlx.core as mx
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import KVCache, _BaseCache, dynamic_roll

RECENT = 16  # a trim of up to this many tokens needs no replay
CHECKPOINT = 256  # the canon tail before every multiple of this position is kept
REPLAY_STEP = 512  # a replay runs its tokens in forwards of at most this many


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

    def canon_history(self, zeros: mx.array) -> tuple[mx.array, ...]:
        """The last K-1 canon inputs before the new tokens (``zeros`` [B, K-1, width] if
        none), as pieces along the sequence that concatenate to that shape."""

    def canon_valid(self, length: int, new: int) -> Optional[mx.array]:
        """[B, length + new, 1] real-token flags of history and new rows, or None if all are."""

    def append_canon(self, history: tuple, inputs: tuple) -> Optional[list]:
        """Keep what it needs of the new canon inputs that followed ``history``
        (``canon_history``'s pieces): ``inputs`` holds each site's [B, L, channels],
        in the order of the width; arrays the layer output must also wait for, or None.

        A piece of history is an array [B, n, width] or such a tuple of a site's
        arrays (what a cache kept of an earlier forward, not concatenated)."""


@dataclass
class _Row:
    """One row's canon state, positions already moved to where the row is going.

    ``window`` [n, width] holds the inputs of positions ``end - n .. end - 1``
    (``complete``: and zeros before them, the row's start being inside it);
    ``checkpoints`` maps positions to the K-1 inputs before them; a tail at a
    position at or before ``pad`` is zeros (left padding or the first token).
    """

    window: mx.array
    end: int
    complete: bool
    checkpoints: dict[int, mx.array] = field(default_factory=dict)
    pad: int = 0

    def tail_at(self, position: int, size: int) -> Optional[mx.array]:
        """The ``size`` inputs before ``position``, or None if this row cannot tell."""
        if position <= self.pad:
            return mx.zeros((size, self.window.shape[-1]), self.window.dtype)
        if position in self.checkpoints:
            return self.checkpoints[position]
        start = self.end - self.window.shape[0]
        if position > self.end or (position - size < start and not self.complete):
            return None
        return _last_rows(self.window[: self.window.shape[0] - (self.end - position)], size)


def _full(piece) -> mx.array:
    """A piece of canon inputs as one array [B, n, width] (a tuple: joined by site)."""
    return mx.concatenate(piece, axis=-1) if isinstance(piece, tuple) else piece


def history_array(pieces) -> mx.array:
    """Pieces of canon inputs (``canon_history``'s, or a window's) as one array
    [B, rows, width]."""
    return mx.concatenate([_full(piece) for piece in pieces], axis=1)


def canon_rows(pieces, start: int, stop: int) -> mx.array:
    """Rows ``start .. stop-1`` [B, stop-start, width] of canon input ``pieces`` (as
    ``history_array`` joins them), as a new array: only those rows are copied, and
    it holds no buffer of the pieces (a forward's inputs are freed once evaluated)."""
    parts, first = [], 0
    for piece in pieces:
        arrays = piece if isinstance(piece, tuple) else (piece,)
        rows = arrays[0].shape[1]
        low, high = max(start - first, 0), min(stop - first, rows)
        first += rows
        if low >= high:
            continue
        if (low, high) != (0, rows):
            arrays = tuple(a[:, low:high] for a in arrays)
        parts.append(mx.concatenate(arrays, axis=-1) if len(arrays) > 1 else arrays[0])
    if len(parts) == 1:  # a one-array concatenate would be a view: copy instead
        return parts[0] * 1
    return mx.concatenate(parts, axis=1)


def _last_rows(rows: mx.array, size: int) -> mx.array:
    """The last ``size`` rows of ``rows`` [n, width] (axis -2), zeros before the first."""
    missing = size - rows.shape[-2]
    if missing > 0:
        zeros = mx.zeros((*rows.shape[:-2], missing, rows.shape[-1]), rows.dtype)
        return mx.concatenate([zeros, rows], axis=-2)
    return rows[..., rows.shape[-2] - size :, :]


class DharaCache(_BaseCache):
    """KV cache and bounded canon state of one decoder layer (see the module docstring)."""

    # Class-level defaults of what ``state`` does not hold (``from_state`` skips
    # ``__init__``): a right-padded prefill in progress, the current forward.
    _ends: Optional[list[int]] = None
    _captured: Optional[mx.array] = None
    _unreplayable: bool = False
    _pad_limit: Optional[int] = None  # the largest left padding of the rows, once read
    _one_row_chunks: int = 0  # how many of the window's last pieces hold one row each

    def __init__(self, kv: Optional[object] = None):
        self.kv = kv if kv is not None else KVCache()
        self.length = 0  # positions held (the KV buffer's, left padding included)
        self._window: list[mx.array] = []  # canon inputs [B, n, width], oldest first
        self._window_rows = 0
        self._complete = True  # the window goes back to position 0
        self._tokens: list[mx.array] = []  # [B, n] token ids of every position, -1: unknown
        self._checkpoints: list[dict[int, mx.array]] = []  # per row
        self._replay = None  # a deep trim left the canon state at this position
        self._kept = 0  # K - 1, known from the first forward

    # -- mlx-lm's cache protocol -------------------------------------------------

    @property
    def offset(self):
        return self.kv.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        return self.kv.update_and_fetch(keys, values)

    def make_mask(self, *args, **kwargs):
        return self.kv.make_mask(*args, **kwargs)

    def size(self) -> int:
        return self.length

    def empty(self) -> bool:
        return self.kv.empty()

    def is_trimmable(self) -> bool:
        return True

    @property
    def nbytes(self) -> int:
        canon = [
            a for piece in self._window for a in (piece if isinstance(piece, tuple) else [piece])
        ]
        canon += self._tokens
        canon += [t for row in self._checkpoints for t in row.values()]
        return self.kv.nbytes + sum(a.nbytes for a in canon)

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> "DharaCache":
        """Quantize the keys and values; the canon state stays in float."""
        if not hasattr(self.kv, "to_quantized"):
            return self
        quantized = self._like(self.kv.to_quantized(group_size=group_size, bits=bits))
        if self._window:
            quantized._set_window(self._window_array(), self._complete)
        quantized._tokens = list(self._tokens)
        quantized._checkpoints = [dict(row) for row in self._checkpoints]
        quantized._replay = self._replay
        return quantized

    def trim(self, n: int) -> int:
        """Roll back ``n`` tokens: from the window, or back to a checkpoint to replay."""
        n = min(n, self.length)
        if n == 0:
            return 0
        target = self.length - n
        tokens = self._token_array()
        at = self._replay if self._replay is not None else self.length
        if target < at and not self._window_covers(at, target):
            rows = self._rows(target)
            start = self._replay_start(rows)
            if start < target and (tokens[:, start:target] < 0).any().item():
                raise ValueError(
                    f"cannot trim this dhara cache to {target} tokens: the canon state "
                    "there came from a forward with its own attention mask or with input "
                    "embeddings, which a replay of token ids cannot repeat. Trim to the end "
                    "of that forward or before its start, or prefill again."
                )
            tails = [row.tail_at(start, self._kept) for row in rows]
            self._set_window(mx.stack(tails), complete=start <= self._kept)
            self._replay = start if start < target else None
            at = start
        elif target < at:
            window = self._window_array()
            self._set_window(window[:, : window.shape[1] - (at - target)])
            self._replay = None
        self._checkpoints = [
            {p: t for p, t in row.items() if p <= min(at, target)} for row in self._checkpoints
        ]
        self._tokens = [tokens[:, :target]]
        self.kv.trim(n)
        self.length = target
        return n

    @property
    def state(self):
        tokens = self._token_array()
        self._tokens = [tokens]
        window = history_array(self._window) if self._window else None
        positions, rows, tails = [], [], []
        for row, held in enumerate(self._checkpoints):
            for position, tail in held.items():
                positions.append(position)
                rows.append(row)
                tails.append(tail)
        checkpoints = [mx.array(positions), mx.array(rows), mx.stack(tails)] if tails else None
        flags = mx.array([self.length, self._window_rows, int(self._complete), self._kept])
        replay = -1 if self._replay is None else self._replay
        return [(self.kv.state, type(self.kv).__name__), flags, window, tokens, checkpoints, replay]

    @state.setter
    def state(self, v):
        (kv_state, kv_class), flags, window, tokens, checkpoints, replay = v
        self.kv = getattr(mlx_cache, kv_class).from_state(kv_state)
        self.length, self._window_rows, complete, self._kept = flags.tolist()
        self._complete = bool(complete)
        self._window = [] if window is None else [window]
        self._one_row_chunks = int(window is not None and window.shape[1] == 1)
        self._tokens = [] if tokens is None or tokens.size == 0 else [tokens]
        batch = tokens.shape[0] if tokens is not None and tokens.ndim == 2 else 0
        self._checkpoints = [{} for _ in range(batch)]
        if checkpoints is not None:
            positions, rows, tails = checkpoints
            for position, row, tail in zip(positions.tolist(), rows.tolist(), tails):
                self._checkpoints[row][position] = tail
        self._replay = None if replay < 0 else replay

    # -- batching (mlx-lm's BatchGenerator) ---------------------------------------

    @classmethod
    def merge(cls, caches: list["DharaCache"]) -> "DharaCache":
        kv = caches[0].kv.merge([c.kv for c in caches])
        merged = DharaCache(kv)
        merged.length = max(c.length for c in caches)
        merged._kept = max(c._kept for c in caches)
        merged._assemble([r for c in caches for r in c._rows(c.length, merged.length - c.length)])
        merged._tokens = [
            mx.concatenate([c._token_array(pad=merged.length - c.length) for c in caches])
        ]
        return merged

    def extend(self, other: "DharaCache") -> None:
        length = max(self.length, other.length)
        rows = self._rows(self.length, length - self.length)
        rows += other._rows(other.length, length - other.length)
        tokens = [c._token_array(pad=length - c.length) for c in (self, other)]
        self.kv.extend(other.kv)
        self._pad_limit = None
        self._kept = self._kept or other._kept
        self.length = length
        self._assemble(rows)
        self._tokens = [mx.concatenate(tokens)]

    def filter(self, batch_indices) -> None:
        keep = [int(i) for i in batch_indices]
        rows = self._rows(self.length)
        before = self.kv.size()
        self.kv.filter(batch_indices)
        self._pad_limit = None
        shift = before - self.kv.size()  # mlx-lm drops the padding all rows share
        self.length -= shift
        for row in rows:
            row.end -= shift
            row.pad -= shift
            row.checkpoints = {p - shift: t for p, t in row.checkpoints.items() if p > shift}
        self._assemble([rows[i] for i in keep])
        self._tokens = [self._token_array()[mx.array(keep)][:, shift:]]

    def extract(self, idx: int) -> "DharaCache":
        pad = self._pads()[idx]
        kv = self.kv.extract(idx)
        single = self._like(kv)
        single.length = self.length - pad
        single._assemble([self._rows(self.length, -pad)[idx]])
        single._tokens = [self._token_array()[idx : idx + 1, pad:]]
        return single

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None) -> None:
        self.kv.prepare(left_padding=left_padding, lengths=lengths, right_padding=right_padding)
        self._pad_limit = None
        if right_padding is not None and max(right_padding) > 0:
            self._ends = [self.length + n for n in lengths]
            self._captured = None

    def finalize(self) -> None:
        """After a right-padded prefill: each row's state at its last token, moved right."""
        ends, self._ends = self._ends, None
        self.kv.finalize()
        self._pad_limit = None
        if ends is None:
            return
        shifts = [self.length - e for e in ends]
        rows = []
        for b, (end, shift) in enumerate(zip(ends, shifts)):
            held = {p + shift: t for p, t in self._checkpoints[b].items() if p <= end}
            window = self._captured[b]
            complete = self._complete and end <= window.shape[0]
            rows.append(_Row(window, self.length, complete, held, self._pads()[b]))
        self._assemble(rows)
        self._captured = None
        self._tokens = [dynamic_roll(self._token_array(), mx.array(shifts), axis=1)]

    # -- the layer's side (``LayerCache``) ------------------------------------------

    def canon_history(self, zeros: mx.array) -> tuple[mx.array, ...]:
        """The last K-1 canon inputs, as the window's pieces (no copy); positions
        before the first are zeros."""
        if self._replay is not None:
            raise RuntimeError("the cache must replay its trimmed tokens first (prepare_forward)")
        size = zeros.shape[1]
        if not self._window or size == 0:
            return (zeros,)
        if self._one_row_chunks >= size:  # decoding: the last K-1 forwards, a row each
            return tuple(self._window[-size:])
        pieces, rows = [], 0
        for chunk in reversed(self._window):
            count = (chunk[0] if isinstance(chunk, tuple) else chunk).shape[1]
            if rows + count > size:
                skip = rows + count - size
                if isinstance(chunk, tuple):
                    chunk = tuple(site[:, skip:] for site in chunk)
                else:
                    chunk = chunk[:, skip:]
                count = size - rows
            pieces.append(chunk)
            rows += count
            if rows == size:
                break
        if rows < size:
            pieces.append(zeros[:, : size - rows])
        return tuple(reversed(pieces))

    def canon_valid(self, length: int, new: int) -> Optional[mx.array]:
        """[B, length + new, 1]: which rows of the history and the new inputs are tokens.

        None unless the cache is a batch with left padding, whose padded rows must
        read as zeros in the convs.
        """
        left_padding = getattr(self.kv, "left_padding", None)
        if left_padding is None:
            return None
        if self._pad_limit is None:
            self._pad_limit = max(self._pads(), default=0)
        if self.length - length >= self._pad_limit:  # past every row's padding
            return None
        positions = mx.arange(self.length - length, self.length + new)
        return (positions[None, :] >= left_padding[:, None])[..., None]

    def append_canon(self, history: tuple, inputs: tuple) -> Optional[list]:
        """Keep the new canon inputs in the window (as they are: no copy), and the
        tails at the checkpoints they pass; returns the copies made, for the layer
        output to wait on."""
        batch, count = inputs[0].shape[:2]
        start = self.length
        if (  # decoding, between checkpoints: keep the inputs, nothing else
            count == 1
            and self._ends is None
            and not self._unreplayable
            and (start + 1) % CHECKPOINT
            and len(self._checkpoints) == batch
        ):
            self._window.append(inputs)
            self._one_row_chunks += 1
            self._window_rows += 1
            self.length = start + 1
            if self._one_row_chunks != len(self._window):
                self._drop_old(RECENT + self._kept)
            elif self._window_rows > RECENT + self._kept:  # a row a piece: drop the oldest
                self._window.pop(0)
                self._window_rows -= 1
                self._one_row_chunks -= 1
                self._complete = False
            return None
        self._kept = sum(self._rows_of(piece) for piece in history)
        if len(self._checkpoints) != batch:
            self._checkpoints = [{} for _ in range(batch)]
        start, keep = self.length, RECENT + self._kept
        made = []
        if self._ends is not None:
            made.append(self._capture(history, _full(inputs), keep))
        crossed = []
        if start + count >= start // CHECKPOINT * CHECKPOINT + CHECKPOINT:  # rarely
            crossed = range(
                start // CHECKPOINT * CHECKPOINT + CHECKPOINT, start + count + 1, CHECKPOINT
            )
        if self._unreplayable and (start + count) % CHECKPOINT:
            crossed = [*crossed, start + count]  # replays may start after this forward
        for position in crossed:
            shift = position - start
            tails = canon_rows((*history, inputs), shift, shift + self._kept)
            made.append(tails)
            for b in range(batch):
                self._checkpoints[b][position] = tails[b]
        if count > keep:
            inputs = canon_rows((inputs,), count - keep, count)  # the forward's are freed
            made.append(inputs)
            self._complete = False
            count_kept = keep
        else:
            count_kept = count
        self._window.append(inputs)
        self._one_row_chunks = self._one_row_chunks + 1 if count_kept == 1 else 0
        self._window_rows += count_kept
        self._drop_old(keep)
        self.length += count
        return made or None

    def record(self, tokens: mx.array, replayable: bool) -> None:
        """Before a forward: its token ids [B, L] (int32), ``replayable`` unless a
        replay could not repeat it (input embeddings, an attention mask of the caller's)."""
        self._unreplayable = not replayable
        self._tokens.append(tokens)
        if len(self._tokens) >= 64:
            self._tokens = [self._token_array()]

    # -- internals -----------------------------------------------------------------

    def _like(self, kv) -> "DharaCache":
        """A new cache around ``kv`` with this one's length and canon width."""
        out = DharaCache(kv)
        out.length, out._kept = self.length, self._kept
        return out

    def _drop_old(self, keep: int) -> None:
        """Drop the oldest pieces of the window while ``keep`` rows remain without them."""
        while self._window_rows - self._rows_of(self._window[0]) >= keep:
            self._window_rows -= self._rows_of(self._window.pop(0))
            self._complete = False
        self._one_row_chunks = min(self._one_row_chunks, len(self._window))

    @staticmethod
    def _rows_of(piece) -> int:
        return (piece[0] if isinstance(piece, tuple) else piece).shape[1]

    def _window_array(self) -> mx.array:
        if len(self._window) > 1 or isinstance(self._window[0], tuple):
            self._window = [history_array(self._window)]
            self._one_row_chunks = int(self._window[0].shape[1] == 1)
        return self._window[0]

    def _set_window(self, window: mx.array, complete: Optional[bool] = None) -> None:
        self._window, self._window_rows = [window], window.shape[1]
        self._one_row_chunks = int(window.shape[1] == 1)
        if complete is not None:
            self._complete = complete

    def _token_array(self, pad: int = 0) -> mx.array:
        """Every position's token id [B, length] (``pad`` zeros in front)."""
        if len(self._tokens) != 1:
            batch = self._tokens[0].shape[0] if self._tokens else self._batch()
            tokens = mx.concatenate(self._tokens, axis=1) if self._tokens else None
            self._tokens = [tokens if tokens is not None else mx.zeros((batch, 0), mx.int32)]
        tokens = self._tokens[0]
        if pad:
            tokens = mx.pad(tokens, [(0, 0), (pad, 0)])
        return tokens

    def _batch(self) -> int:
        """Rows in this cache (1 while it is empty)."""
        if self._tokens:
            return self._tokens[0].shape[0]
        left_padding = getattr(self.kv, "left_padding", None)
        return 1 if left_padding is None else left_padding.shape[0]

    def _pads(self) -> list[int]:
        left_padding = getattr(self.kv, "left_padding", None)
        return [0] * self._batch() if left_padding is None else left_padding.tolist()

    def _window_covers(self, at: int, target: int) -> bool:
        """The window (ending at ``at``) holds the K-1 inputs before ``target``."""
        return self._complete or not self._kept or target - self._kept >= at - self._window_rows

    def _rows(self, upto: int, shift: int = 0) -> list[_Row]:
        """Each row's state as of position ``upto``, positions moved by ``shift``."""
        at = self._replay if self._replay is not None else self.length
        batch = self._batch()
        if self._window:
            window = self._window_array()
            covered = window.shape[1] - (at - upto) if upto < at else window.shape[1]
            window = window[:, : max(covered, 0)]
        else:
            window = None
        pads = self._pads()
        rows = []
        for b in range(batch):
            held = self._checkpoints[b] if b < len(self._checkpoints) else {}
            held = {p + shift: t for p, t in held.items() if p <= upto and p + shift > 0}
            if window is None:
                empty = mx.zeros((0, 0), mx.float32)
                rows.append(_Row(empty, upto + shift, self._complete, held, pads[b] + shift))
                continue
            positions = mx.arange(min(at, upto) - window.shape[1], min(at, upto))[:, None]
            row = mx.where(positions >= pads[b], window[b], 0)  # padding reads as zeros
            end = min(at, upto) + shift
            rows.append(_Row(row, end, self._complete, held, pads[b] + shift))
        return rows

    def _assemble(self, rows: list[_Row]) -> None:
        """Take ``rows`` (this cache's rows, positions already moved) as the canon state."""
        self._checkpoints = [row.checkpoints for row in rows]
        self._replay = None
        width = max((row.window.shape[-1] for row in rows), default=0)
        if width == 0 or not self._kept:
            self._window, self._window_rows, self._complete = [], 0, True
            self._one_row_chunks = 0
            return
        for row in rows:
            if row.window.shape[-1] != width:  # a row that has seen no forward yet
                dtype = next(r.window.dtype for r in rows if r.window.shape[-1] == width)
                row.window = mx.zeros((0, width), dtype)
        if all(row.end == self.length for row in rows):
            size = min(
                (row.window.shape[0] for row in rows if not row.complete),
                default=max(row.window.shape[0] for row in rows),
            )
            size = max(size, self._kept) if all(r.complete for r in rows) else size
            if size >= self._kept:
                windows = [row.tail_at(self.length, size) for row in rows]
                self._set_window(mx.stack(windows), all(r.complete for r in rows))
                return
        start = self._replay_start(rows)
        self._set_window(
            mx.stack([row.tail_at(start, self._kept) for row in rows]), start <= self._kept
        )
        self._replay = start if start < self.length else None

    def _replay_start(self, rows: list[_Row]) -> int:
        """The latest position, at or before every row's end, where every row has a tail."""
        latest = min(row.end for row in rows)
        candidates = {0, latest}
        for row in rows:
            candidates |= {p for p in row.checkpoints if p <= latest} | {row.pad}
        for position in sorted((c for c in candidates if 0 <= c <= latest), reverse=True):
            if all(r.tail_at(position, self._kept) is not None for r in rows):
                return position
        return 0

    def _capture(self, history: tuple, inputs: mx.array, keep: int) -> mx.array:
        """Right-padded prefill: each row's window at its last token, when it is in
        this forward (the padding after it is dropped at ``finalize``)."""
        start, count = self.length, inputs.shape[1]
        before = self._last_inputs(history, keep)
        joined = mx.concatenate([before, inputs], axis=1)
        offsets = mx.array([min(max(e - start, 0), count) for e in self._ends])
        index = (offsets[:, None] + mx.arange(keep))[..., None]
        window = mx.take_along_axis(joined, index, axis=1)
        inside = mx.array([start < e <= start + count for e in self._ends])[:, None, None]
        previous = self._captured if self._captured is not None else window
        self._captured = mx.where(inside, window, previous)
        return self._captured

    def _last_inputs(self, history: tuple, size: int) -> mx.array:
        """The last ``size`` canon inputs [B, size, width] (zeros before the first)."""
        return _last_rows(history_array(self._window if self._window else history), size)

    def rewind(self) -> Optional[int]:
        """Before a replay: back to where the canon state is; the position, or None."""
        start = self._replay
        if start is None:
            return None
        self.kv.trim(self.length - start)
        self._tokens = [self._token_array()[:, :start]]
        self._checkpoints = [
            {p: t for p, t in row.items() if p <= start} for row in self._checkpoints
        ]
        self.length, self._replay = start, None
        return start


def prepare_forward(
    model, caches: list, inputs: Optional[mx.array], own_mask: bool, shape: tuple[int, int]
) -> None:
    """Before ``model``'s forward over ``DharaCache`` layers: replay what a deep trim
    left to recompute, then record the forward's token ids (``shape`` = (B, L))."""
    first = caches[0]
    if first._replay is not None:
        tokens = first._token_array()[:, first._replay : first.length]
        for cache in caches:
            cache.rewind()
        for start in range(0, tokens.shape[1], REPLAY_STEP):
            model(tokens[:, start : start + REPLAY_STEP], cache=caches)
            mx.eval([c.state for c in caches])
    replayable = inputs is not None and not own_mask
    if not replayable:
        tokens = mx.full(shape, -1, mx.int32)
    else:
        tokens = inputs if inputs.dtype == mx.int32 else inputs.astype(mx.int32)
    for cache in caches:
        cache.record(tokens, replayable)
