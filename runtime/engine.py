"""The decoding core: requests become rows, and every mode advances its rows in steps.

A request is a ``Row`` (its tokens, settings, sampling, stats and where it
stands). ``Engine.step`` does a slice of prefill for rows that are joining, then
one step of every mode that has rows: one batched forward for the AR rows, one
draft-verify round (two forwards) for the self-speculation rows, one denoising
step (one forward) for the block diffusion rows. Rows join and leave between
steps. ``decode``, ``generate_batch``, the CLI and the server all drive this loop.

Contracts (``contracts.py``): the engine gives the model a ``RowCache``'s
per-layer views and an explicit mask; the model reads each row's positions from
the cache's ``offset``, appends KV and canon inputs through it, returns hidden
states, and never rolls anything back itself; ``model.head`` makes logits of
only the positions a step reads. The mode step functions (``ar``, ``spec``,
``diffusion`` modules) own what a row means, the engine owns where rows sit. A
row's tokens are those it gets alone: every batched computation is row by row
(padding is masked out), and its random draws depend only on (seed, position).
"""

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import mlx.core as mx

from ..slot_cache import row_cache
from . import diffusion
from .ar import ar_step, draw, read_tokens
from .contracts import BlockDecoding, RowCache
from .prefix_cache import PrefixCache
from .sampling import Sampling, read_report, token_logprob
from .settings import Settings, default_block_len, require_mode
from .spec import spec_step
from .stats import Stats, Step

PREFILL_STEP = 512  # prompt tokens a step prefills, so that long prompts do not stall others


@dataclass(eq=False)
class Row:
    """One request: its tokens so far (``seq``, the prompt first) and where it stands.

    ``cache`` is the row's own one-row cache while it is prefilled; then it sits
    in slot ``slot`` of its mode's ``Group``. Diffusion rows denoise ``block``,
    which starts at position ``start`` and whose first ``final`` tokens are final.
    """

    prompt: list[int]
    settings: Settings
    sampling: Sampling
    stats: Stats
    seq: list[int]
    cache: Optional[RowCache] = None
    group: Optional["Group"] = None
    slot: int = -1
    done: bool = False
    block: list[int] = field(default_factory=list)
    start: int = 0
    final: int = 0
    phase: int = 0  # where the row's block grid starts (``BlockDecoding.block_phase``)
    block_steps: int = 0  # denoising steps taken on the current block
    committed: list = field(default_factory=list)  # the step that committed each block position
    block_logprobs: list = field(default_factory=list)  # TokenLogprob of each committed position

    @property
    def mode(self) -> str:
        return self.settings.mode

    @property
    def grid(self) -> Optional[int]:
        """The block grid of the row's KV: diffusion's block length, None when causal."""
        return self.settings.block_len if self.mode == "diffusion" else None

    def emit(self, tokens: list[int], logprobs: Optional[list] = None) -> Step:
        """Record ``tokens`` as final; the Step to hand out, with the finish reason set
        when the run ends with them (and their TokenLogprobs, when the row asks; extra
        entries, past a stop, are dropped)."""
        self.seq.extend(tokens)
        self.stats.emitted(len(tokens))
        settings, stats = self.settings, self.stats
        if tokens and tokens[-1] in settings.stop_ids:
            stats.finish_reason = "stop"
        elif stats.generated >= settings.max_tokens:
            stats.finish_reason = "length"
        self.done = stats.finish_reason is not None
        if self.settings.logprobs is None:
            return Step(tokens, stats)
        return Step(tokens, stats, logprobs=list(logprobs or [])[: len(tokens)])


def run_rows(
    model, cache: RowCache, tokens: mx.array, real: Sequence[int], grids: Sequence[int]
) -> mx.array:
    """Final hidden states [rows, L, hidden] of ``tokens`` [rows, L] appended at each
    row's length; ``model.head`` turns the positions a step reads into logits.

    Row b's first ``real[b]`` tokens are real (the rest padding), under block
    grid ``grids[b]`` (1: causal). The caller commits the rows' new lengths.
    """
    mask = cache.prepare(tokens.shape[1], real, grids)
    return model.model(tokens, cache=cache.layers, mask=mask)


def padded(rows: Sequence[Sequence[int]], fill: int = 0) -> mx.array:
    """[len(rows), longest] token ids, right-padded with ``fill``."""
    width = max(len(r) for r in rows)
    return mx.array([list(r) + [fill] * (width - len(r)) for r in rows])


class Group:
    """The rows of one mode in one ``RowCache``; a free slot holds ``None``.

    Free slots ride along in forwards as padding until there are more of them
    than rows, when the cache is compacted (a copy of the rows kept).
    """

    def __init__(self, model, mode: str, step):
        self.model, self.mode, self._step = model, mode, step
        self.cache = row_cache(model, 0)
        self.rows: list[Optional[Row]] = []
        self.pending: Optional[tuple] = None  # AR tokens (and report) drawn but not read yet
        self.counts: Optional[mx.array] = None  # AR rows' penalty contexts, pending included

    @property
    def active(self) -> list[Row]:
        return [r for r in self.rows if r is not None]

    def step(self) -> list[tuple[Row, Step]]:
        return self._step(self) if self.active else []

    def flush(self) -> list[tuple[Row, Step]]:
        """Read what a pipelined step left in flight (before the slots change)."""
        if self.pending is None:
            return []
        drawn, self.pending = self.pending, None
        return read_tokens(self, drawn)

    def insert(self, rows: list[Row], source: RowCache, index: list[int]) -> list:
        """Give each of ``rows`` a slot holding its state, row ``index[i]`` of ``source``.

        An empty group whose newcomers are all of ``source`` takes ``source`` as
        its cache (no copy); otherwise the rows are copied into free slots, made
        in one allocation when there are too few.
        """
        events = self.flush()
        if not self.active and index == list(range(source.rows)):
            self.cache, self.rows = source, list(rows)
        else:
            missing = len(rows) - self.rows.count(None)
            if missing > 0:
                grow = max(missing, len(self.rows))
                self.cache.add_rows(grow)
                self.rows += [None] * grow
            for row, i in zip(rows, index):
                slot = self.rows.index(None)
                self.cache.put_row(slot, source, i)
                self.rows[slot] = row
        for slot, row in enumerate(self.rows):
            if row is not None and row in rows:
                row.slot, row.group, row.cache = slot, self, None
        return events

    def remove(self, row: Row) -> None:
        self.rows[row.slot] = None
        self.cache.lengths[row.slot] = 0
        row.slot, row.group = -1, None

    def compact(self) -> None:
        """Drop free slots when they outnumber the rows (or free everything)."""
        active = [slot for slot, r in enumerate(self.rows) if r is not None]
        if not active:
            self.cache, self.rows = row_cache(self.model, 0), []
        elif len(self.rows) - len(active) > len(active):
            self.cache.keep_rows(active)
            self.rows = [self.rows[slot] for slot in active]
            for slot, r in enumerate(self.rows):
                r.slot = slot


class Engine:
    """Decodes many requests at once; ``add`` rows, call ``step`` until they are done.

    At most ``max_batch`` rows are in flight (prefilling or decoding); more wait
    in arrival order. With a ``prefix_cache``, a row starts from the longest
    reusable prefix it holds and leaves its own state there when it ends.
    """

    def __init__(
        self,
        model,
        *,
        max_batch: int = 32,
        prefix_cache: Optional[PrefixCache] = None,
        prefill_step: int = PREFILL_STEP,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}.")
        self.model, self.max_batch, self.prefill_step = model, max_batch, prefill_step
        self.blocks: BlockDecoding = getattr(model, "block_decoding", diffusion)
        self.prefix_cache = prefix_cache if getattr(model, "reuses_prefixes", True) else None
        steps = {"ar": ar_step, "spec": spec_step, "diffusion": self.blocks.step}
        self.groups = {mode: Group(model, mode, step) for mode, step in steps.items()}
        self.waiting: deque[Row] = deque()
        self.joining: deque[Row] = deque()
        self._held: list[tuple[Row, Step]] = []  # made final between steps (by a cancel)

    def add(self, prompt: list[int], settings: Settings, sampling: Sampling) -> Row:
        """Queue a request (already checked, with a concrete seed when sampled).

        Every request passes here, so here a mode the model lacks is refused (a
        ValueError that names the missing MASK token), before anything runs.
        """
        args = self.model.args
        require_mode(args, settings.mode)
        sampling.check_vocab(args.vocab_size)
        if settings.block_len is None:
            settings = replace(settings, block_len=default_block_len(args))
        row = Row(prompt, settings, sampling, Stats(settings.mode, len(prompt)), list(prompt))
        self.waiting.append(row)
        return row

    @property
    def rows(self) -> list[Row]:
        """Every row not finished: waiting, joining and decoding."""
        decoding = [r for g in self.groups.values() for r in g.active]
        return list(self.waiting) + list(self.joining) + decoding

    def cancel(self, row: Row) -> None:
        """Stop ``row`` now; its state goes to the prefix cache, as at a normal end."""
        if row.done:
            return
        row.done = True
        self._leave(row)

    def step(self) -> list[tuple[Row, Step]]:
        """Prefill some, decode one step of every mode; the Steps rows made final,
        one per row (its tokens of this step together)."""
        events, self._held = self._held + self._join(), []
        for group in self.groups.values():
            events += group.step()
        for group in self.groups.values():
            if any(r.done for r in group.active):
                events += group.flush()
                for row in [r for r in group.active if r.done]:
                    self._leave(row)
                group.compact()
        return _one_per_row(events + self._held)

    def fail(self) -> None:
        """After an error inside a step: drop every row, and the prefix cache's entries
        (nothing that a failed step may have touched is kept)."""
        for row in self.rows:
            row.done = True
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        self.waiting.clear()
        self.joining.clear()
        for mode, group in self.groups.items():
            self.groups[mode] = Group(self.model, mode, group._step)

    def _leave(self, row: Row) -> None:
        if row in self.waiting:
            self.waiting.remove(row)
            return
        if row in self.joining:
            self.joining.remove(row)
            cache = row.cache
        else:
            group = row.group
            self._held += group.flush()  # other rows' tokens in flight: handed out next step
            cache = group.cache.take_row(row.slot) if self.prefix_cache is not None else None
            group.remove(row)
            group.compact()
        if self.prefix_cache is not None and cache is not None:
            self.prefix_cache.keep(cache, row.seq, row.grid)

    def _join(self) -> list[tuple[Row, Step]]:
        """Admit waiting rows, then prefill up to ``prefill_step`` prompt tokens of the
        joining rows (in arrival order, together in one forward)."""
        events = []
        while self.waiting and len(self.joining) + self._decoding() < self.max_batch:
            row = self.waiting.popleft()
            if row.settings.max_tokens == 0:
                events.append((row, row.emit([])))
                continue
            self._start(row)
            self.joining.append(row)
        if self.joining:
            events += self._prefill(self._chunks())
        return events

    def _decoding(self) -> int:
        return sum(len(g.active) for g in self.groups.values())

    def _start(self, row: Row) -> None:
        if self.prefix_cache is not None:
            row.cache = self.prefix_cache.take(self.model, row.prompt, row.grid)
        else:
            row.cache = row_cache(self.model)
        if row.grid is not None:
            row.phase = self.blocks.block_phase(len(row.prompt), row.grid)
            row.cache.phases = [row.phase]
        row.stats.reused_tokens = row.cache.lengths[0]

    @staticmethod
    def _todo(row: Row, held: Optional[int] = None) -> list[int]:
        """Prompt tokens still to prefill after the ``held`` ones (default: the row's
        cache): all of them (causal: the last one's logits give the first token),
        whole blocks of the row's grid (diffusion)."""
        held = row.cache.lengths[0] if held is None else held
        if row.grid is None:
            return row.seq[held:]
        end = (len(row.seq) + row.phase) // row.grid * row.grid - row.phase
        return row.seq[held:end]

    def _chunks(self) -> list[tuple[Row, list[int]]]:
        """The next prompt chunk of each joining row that the step's budget reaches."""
        chunks, budget = [], self.prefill_step
        for row in self.joining:
            todo = self._todo(row)
            size = min(len(todo), max(budget, 1))
            if row.grid is not None and size:  # whole blocks: no query misses a key of its block
                held, grid = row.cache.lengths[0], row.grid
                first = -(held + row.phase) % grid or grid  # up to the next block boundary
                size = first if size <= first else first + (size - first) // grid * grid
            chunks.append((row, todo[:size]))
            budget -= size
            if budget <= 0:
                break
        return chunks

    def _prefill(self, chunks: list[tuple[Row, list[int]]]) -> list[tuple[Row, Step]]:
        """Feed each row its chunk in one forward; causal rows whose prompt is then in
        draw their first token from its last position, and every row whose prompt is
        in takes a slot in its group."""
        rows = [row for row, _ in chunks]
        cache = (
            rows[0].cache if len(rows) == 1 else type(rows[0].cache).stack([r.cache for r in rows])
        )
        real = [len(chunk) for _, chunk in chunks]
        hidden = None
        if any(real):
            grids = [row.grid or 1 for row in rows]
            tokens = padded([c or [0] for _, c in chunks])
            hidden = run_rows(self.model, cache, tokens, real, grids)
            cache.commit([n + k for n, k in zip(cache.lengths, real)])
            mx.async_eval(cache.state())
        done = [not self._todo(row, cache.lengths[i]) for i, row in enumerate(rows)]
        causal = [d and row.grid is None for d, row in zip(done, rows)]
        events = self._first_tokens(rows, hidden, real, causal) if any(causal) else []
        joined: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            if not done[i]:
                row.cache = cache if len(rows) == 1 else cache.take_row(i)
                continue
            self.joining.remove(row)
            if row.done:  # ended with its first token
                if self.prefix_cache is not None:
                    self.prefix_cache.keep(cache.take_row(i), row.seq, None)
                continue
            if row.grid is not None:
                row.stats.prefilled()
                self.blocks.start_block(row, self.model.args.mask_token_id)
            joined.setdefault(row.mode, []).append(i)
        for mode, index in joined.items():
            events += self.groups[mode].insert([rows[i] for i in index], cache, index)
        return events

    def _first_tokens(self, rows: list[Row], hidden: mx.array, real: list[int], which: list[bool]):
        """The first generated token of the rows flagged in ``which``, from the prefill
        forward's ``hidden`` states at their prompt's last token (a causal row's last
        chunk always holds it)."""
        chosen = [i for i, w in enumerate(which) if w]
        last = mx.array([real[i] - 1 for i in chosen])
        logits = self.model.head(hidden[mx.array(chosen), last])
        picked = [rows[i] for i in chosen]
        tokens, report = draw(self.model, logits, picked, [len(r.seq) for r in picked])
        report = read_report(report)
        events = []
        for b, (row, token) in enumerate(zip(picked, tokens.tolist())):
            stats = row.stats
            stats.forwards += 1
            stats.rounds += 1  # AR: a token; spec: the anchor's round, with no drafts
            stats.prefilled()
            top = row.settings.logprobs
            logprobs = None
            if top is not None:
                logprobs = [token_logprob(report, b, token, top)]
            events.append((row, row.emit([token], logprobs)))
        return events


def _one_per_row(events: list[tuple[Row, Step]]) -> list[tuple[Row, Step]]:
    """Merge the Steps of a row into one, in order, so that only a row's last Step
    of a run carries its finish reason (``stats`` is the row's live object)."""
    merged: dict[int, tuple[Row, Step]] = {}
    for row, step in events:
        if id(row) in merged:
            first = merged[id(row)][1]
            first.tokens.extend(step.tokens)
            if first.logprobs is not None:
                first.logprobs.extend(step.logprobs or [])
            if step.block is not None:
                first.block, first.block_start = step.block, step.block_start
                first.committed = step.committed
        else:
            logprobs = None if step.logprobs is None else list(step.logprobs)
            merged[id(row)] = (row, replace(step, tokens=list(step.tokens), logprobs=logprobs))
    return list(merged.values())
