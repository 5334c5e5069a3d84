"""Autoregressive decoding: one token a row per batched causal forward, pipelined.

A row's cache holds all its tokens but the last, which the next forward feeds.
The step builds the next forward on the tokens just sampled while they are
still being computed (``mx.async_eval``) and reads them afterwards, so the host
builds step t+1's graph while step t runs; the tokens of step t reach the rows
one step later. Rows that ended meanwhile drop the token drawn after their end.
"""

from typing import TYPE_CHECKING, Optional, Sequence

import mlx.core as mx

from .sampling import Sampling, adjust_rows, choose_rows, presence
from .stats import Step

if TYPE_CHECKING:
    from .engine import Group, Row

_IDLE = Sampling()  # what a free slot "samples"


def next_tokens(
    model, logits: mx.array, rows: Sequence["Row"], positions: Sequence[int], seen=None
) -> mx.array:
    """The AR tokens [rows] at ``positions`` from the logits [rows, vocab] that predict them.

    ``seen`` [rows, vocab] is the penalty context; built from the rows' tokens
    when not given.
    """
    args = model.args
    penalties = [r.sampling.repetition_penalty if r else 1.0 for r in rows]
    if seen is None and any(p != 1.0 for p in penalties):
        seen = mx.stack([presence(r.seq if r else [], args.vocab_size) for r in rows])
    adjusted = adjust_rows(logits, seen, penalties, args.mask_token_id)
    return choose_rows(adjusted, [r.sampling if r else _IDLE for r in rows], positions)


def ar_step(group: "Group") -> list[tuple["Row", Step]]:
    """One forward for every AR row; returns the tokens of the previous step."""
    from .engine import run_rows

    model, cache, rows = group.model, group.cache, group.rows
    pending = group.pending
    if pending is None:
        inputs = mx.array([[r.seq[-1] if r else 0] for r in rows])
    else:
        inputs = pending[:, None]
    real = [1 if r else 0 for r in rows]
    logits = model.head(run_rows(model, cache, inputs, real, [1] * len(rows))[:, -1])
    cache.commit([n + k for n, k in zip(cache.lengths, real)])
    ahead = 0 if pending is None else 1
    positions = [len(r.seq) + ahead if r else 0 for r in rows]
    tokens = next_tokens(model, logits, rows, positions, _penalty_context(group, pending))
    mx.async_eval(tokens)
    group.pending = tokens
    return read_tokens(group, pending) if pending is not None else []


def _penalty_context(group: "Group", pending: Optional[mx.array]) -> Optional[mx.array]:
    """[slots, vocab] seen tokens, kept on the device while steps are pipelined."""
    rows = group.rows
    if all(r is None or r.sampling.repetition_penalty == 1.0 for r in rows):
        group.seen = None
        return None
    vocab = group.model.args.vocab_size
    if pending is None or group.seen is None:
        group.seen = mx.stack([presence(r.seq if r else [], vocab) for r in rows])
    if pending is not None:
        group.seen = group.seen | (mx.arange(vocab) == pending[:, None])
    return group.seen


def read_tokens(group: "Group", tokens: mx.array) -> list[tuple["Row", Step]]:
    """Hand each live row its token from ``tokens`` [slots]."""
    events = []
    for row, token in zip(group.rows, tokens.tolist()):
        if row is None or row.done:
            continue
        row.stats.forwards += 1
        row.stats.rounds += 1
        events.append((row, row.emit([token])))
    return events
