"""Autoregressive decoding: one token a row per batched causal forward, pipelined.

A row's cache holds all its tokens but the last, which the next forward feeds.
The step builds the next forward on the tokens just sampled while they are
still being computed (``mx.async_eval``) and reads them afterwards, so the host
builds step t+1's graph while step t runs; the tokens of step t reach the rows
one step later. Rows that ended meanwhile drop the token drawn after their end.
"""

from typing import TYPE_CHECKING, Optional, Sequence

import mlx.core as mx

from .sampling import (
    Sampling,
    adjust_rows,
    choose_rows,
    logprob_report,
    read_report,
    token_counts,
    token_logprob,
    with_tokens,
)
from .stats import Step

if TYPE_CHECKING:
    from .engine import Group, Row

_IDLE = Sampling()  # what a free slot "samples"


def row_counts(rows: Sequence[Optional["Row"]], vocab_size: int) -> mx.array:
    """[rows, 2, vocab] the penalty context of each row's tokens (zeros for a free slot)."""
    return mx.stack(
        [token_counts(r.seq if r else [], len(r.prompt) if r else 0, vocab_size) for r in rows]
    )


def draw(
    model,
    logits: mx.array,
    rows: Sequence[Optional["Row"]],
    positions: Sequence[int],
    counts: Optional[mx.array] = None,
):
    """The AR tokens [rows] at ``positions`` from the logits [rows, vocab] that predict
    them, and the logprob report of the rows that ask for one (``logprob_report``).

    ``counts`` [rows, 2, vocab] is the penalty context; built from the rows'
    tokens when not given.
    """
    args = model.args
    samplings = [r.sampling if r else _IDLE for r in rows]
    if counts is None and any(s.penalized for s in samplings):
        counts = row_counts(rows, args.vocab_size)
    adjusted = adjust_rows(logits, counts, samplings, args.mask_token_id)
    tokens = choose_rows(adjusted, samplings, positions)
    tops = [r.settings.logprobs if r else None for r in rows]
    return tokens, logprob_report(adjusted, tokens, tops)


def ar_step(group: "Group") -> list[tuple["Row", Step]]:
    """One forward for every AR row; returns the tokens of the previous step."""
    from .engine import run_rows

    model, cache, rows = group.model, group.cache, group.rows
    pending = group.pending
    if pending is None:
        inputs = mx.array([[r.seq[-1] if r else 0] for r in rows])
    else:
        inputs = pending[0][:, None]
    real = [1 if r else 0 for r in rows]
    logits = model.head(run_rows(model, cache, inputs, real, [1] * len(rows))[:, -1])
    cache.commit([n + k for n, k in zip(cache.lengths, real)])
    ahead = 0 if pending is None else 1
    positions = [len(r.seq) + ahead if r else 0 for r in rows]
    tokens, report = draw(model, logits, rows, positions, _penalty_context(group, pending))
    mx.async_eval(tokens, *(report or ()))
    group.pending = (tokens, report)
    return read_tokens(group, pending) if pending is not None else []


def _penalty_context(group: "Group", pending) -> Optional[mx.array]:
    """[slots, 2, vocab] token counts, kept on the device while steps are pipelined."""
    rows = group.rows
    if all(r is None or not r.sampling.penalized for r in rows):
        group.counts = None
        return None
    if pending is None or group.counts is None:
        group.counts = row_counts(rows, group.model.args.vocab_size)
    if pending is not None:
        group.counts = with_tokens(group.counts, pending[0])
    return group.counts


def read_tokens(group: "Group", drawn) -> list[tuple["Row", Step]]:
    """Hand each live row its token from ``drawn`` (tokens [slots] and their report)."""
    tokens, report = drawn
    report = read_report(report)
    events = []
    for b, (row, token) in enumerate(zip(group.rows, tokens.tolist())):
        if row is None or row.done:
            continue
        row.stats.forwards += 1
        row.stats.rounds += 1
        top = row.settings.logprobs
        logprobs = None if top is None else [token_logprob(report, b, token, top)]
        events.append((row, row.emit([token], logprobs)))
    return events
