"""Block diffusion on each row's cache, equal to the uncached reference.

A row appends a block of ``block_len`` MASK tokens (always a whole block, also
the last one: the output is cut to ``max_tokens``, so a run is a prefix of the
same run with a larger ``max_tokens``) and denoises it in steps: each step
predicts every still-masked position and commits the confident ones.

Under the global block grid a query sees its whole block, so the committed
tokens of the last, partial global block see the MASK tokens after them and
change with every step. Only whole global blocks before the new block are
therefore frozen in the cache; each step recomputes the partial tail together
with the block, and rolls the row back to the frozen blocks.
"""

from typing import TYPE_CHECKING

import mlx.core as mx

from .sampling import (
    Sampling,
    adjust_logits,
    adjust_rows,
    choose_rows,
    logprob_report,
    read_report,
    token_counts,
    token_logprob,
)
from .stats import Step

if TYPE_CHECKING:
    from .engine import Group, Row


def denoise_arrays(
    logits: mx.array,
    counts,
    positions: list[int],
    sampling: Sampling,
    threshold: float,
    mask_id: int,
) -> tuple[mx.array, mx.array]:
    """Predictions and commit flags [n] of the masked positions from their logits [n, vocab].

    The confidence of a prediction is its float32 probability (MASK excluded);
    positions at or above ``threshold`` commit, and always the most confident one.
    """
    adjusted = adjust_logits(logits, counts, sampling, mask_id)
    n = len(positions)
    tokens, confidence = choose_rows(adjusted, [sampling] * n, positions, confidence=True)
    best = mx.arange(n) == mx.argmax(confidence)
    return tokens, (confidence >= threshold) | best


def denoise(
    logits: mx.array,
    counts,
    positions: list[int],
    sampling: Sampling,
    threshold: float,
    mask_id: int,
) -> tuple[list[int], list[bool]]:
    """``denoise_arrays`` as lists."""
    tokens, commit = denoise_arrays(logits, counts, positions, sampling, threshold, mask_id)
    return tokens.tolist(), commit.tolist()


def diffusion_step(group: "Group") -> list[tuple["Row", Step]]:
    """One denoising step of every block diffusion row."""
    from .engine import padded, run_rows

    model, cache, slots = group.model, group.cache, group.rows
    mask_id, vocab = model.args.mask_token_id, model.args.vocab_size
    tails = [r.seq[cache.lengths[b] : r.start] + r.block if r else [] for b, r in enumerate(slots)]
    grids = [r.grid if r else 1 for r in slots]
    hidden = run_rows(
        model, cache, padded([t or [0] for t in tails]), [len(t) for t in tails], grids
    )
    cache.commit([r.start // r.grid * r.grid if r else 0 for r in slots])
    where = [  # (slot, masked block indices, their columns in the forward)
        (b, masked, [len(tails[b]) - len(r.block) + i for i in masked])
        for b, r in enumerate(slots)
        if r is not None
        for masked in [[i for i, t in enumerate(r.block) if t == mask_id]]
    ]
    slot_index = mx.array([b for b, _, columns in where for _ in columns])
    column_index = mx.array([c for _, _, columns in where for c in columns])
    logits = model.head(hidden[slot_index, column_index])
    rows = [slots[b] for b, masked, _ in where for _ in masked]
    counts = None
    if any(r.sampling.penalized for r in rows):
        contexts = {
            b: token_counts(
                slots[b].seq[: slots[b].start] + [t for t in slots[b].block if t != mask_id],
                len(slots[b].prompt),
                vocab,
            )
            for b, _, _ in where
        }
        counts = mx.stack([contexts[b] for b, masked, _ in where for _ in masked])
    samplings = [r.sampling for r in rows]
    adjusted = adjust_rows(logits, counts, samplings, mask_id)
    positions = [slots[b].start + i for b, masked, _ in where for i in masked]
    tokens, confidence = choose_rows(adjusted, samplings, positions, True)
    report = logprob_report(adjusted, tokens, [r.settings.logprobs for r in rows])
    thresholds = mx.array([r.settings.threshold for r in rows], mx.float32)
    confident = confidence >= thresholds
    tokens, confidence, confident = tokens.tolist(), confidence.tolist(), confident.tolist()
    report = read_report(report)
    results, first = [], 0
    for b, masked, _ in where:
        end = first + len(masked)
        scores = confidence[first:end]
        best = scores.index(max(scores))  # the most confident always commits (the first on a tie)
        flags = [c or i == best for i, c in enumerate(confident[first:end])]
        results.append((slots[b], masked, first, tokens[first:end], flags))
        first = end
    events = []
    for row, masked, first, row_tokens, flags in results:
        row.stats.forwards += 1
        row.stats.rounds += 1
        if len(row.committed) != len(row.block):
            row.committed = [None] * len(row.block)
            row.block_logprobs = [None] * len(row.block)
        top = row.settings.logprobs
        for j, (i, token, flag) in enumerate(zip(masked, row_tokens, flags)):
            if flag:
                row.block[i] = token
                row.committed[i] = row.stats.rounds
                if top is not None:
                    row.block_logprobs[i] = token_logprob(report, first + j, token, top)
        wanted = row.settings.max_tokens - row.stats.generated
        new = []
        while row.final < len(row.block) and row.block[row.final] != mask_id and len(new) < wanted:
            new.append(row.block[row.final])
            row.final += 1
        logprobs = row.block_logprobs[row.final - len(new) : row.final]
        step = row.emit(row.settings.through_stop(new), logprobs)
        step.block, step.block_start = list(row.block), row.start
        step.committed = list(row.committed)
        events.append((row, step))
        if not row.done and row.final == len(row.block):
            row.start, row.block, row.final = len(row.seq), [mask_id] * row.grid, 0
            row.committed = []
    return events
