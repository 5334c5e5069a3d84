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

from typing import TYPE_CHECKING, Callable, Optional, Sequence

import mlx.core as mx
import numpy as np

from .sampling import (
    Sampling,
    TokenLogprob,
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
    mask_id = model.args.mask_token_id
    tails = [r.seq[cache.lengths[b] : r.start] + r.block if r else [] for b, r in enumerate(slots)]
    grids = [r.grid if r else 1 for r in slots]
    hidden = run_rows(
        model, cache, padded([t or [0] for t in tails]), [len(t) for t in tails], grids
    )
    cache.commit([r.start // r.grid * r.grid if r else 0 for r in slots])
    firsts = [len(t) - len(r.block) if r else 0 for t, r in zip(tails, slots)]
    events = []
    for row, masked, tokens, confidence, logprobs in predict_masked(
        model, slots, hidden, firsts, lambda row, i: row.start + i
    ):
        threshold = float(np.float32(row.settings.threshold))  # compared as float32, as ever
        best = confidence.index(
            max(confidence)
        )  # the most confident always commits (the first on a tie)
        flags = [c >= threshold or i == best for i, c in enumerate(confidence)]
        events.append((row, settle(row, masked, tokens, flags, logprobs, mask_id)))
        if not row.done and row.final == len(row.block):
            start_block(row, mask_id)
    return events


step = diffusion_step  # this module is dhara's BlockDecoding (runtime/contracts.py)


def block_phase(prompt_length: int, grid: int) -> int:
    """dhara's block grid starts at position 0, whatever the prompt."""
    return 0


def start_block(row: "Row", mask_id: int) -> None:
    """A new block of ``block_len`` MASK tokens after the row's tokens (always whole:
    the output is cut to max_tokens)."""
    row.start, row.block, row.final = len(row.seq), [mask_id] * row.grid, 0
    row.committed, row.block_steps = [], 0


def predict_masked(
    model,
    slots: Sequence[Optional["Row"]],
    hidden: mx.array,
    firsts: Sequence[int],
    noise_position: Callable[["Row", int], int],
    tempered_confidence: bool = True,
) -> list[tuple["Row", list[int], list[int], list[float], Optional[list[TokenLogprob]]]]:
    """The prediction at every still-masked position of each live row's block:
    (row, masked block indices, tokens, confidences, TokenLogprobs or None).

    ``hidden`` [slots, L, hidden] is the forward, row b's block starting at column
    ``firsts[b]``; ``noise_position(row, i)`` is the position whose (seed,
    position) noise draws block index i. A token is drawn as AR draws one
    (penalties over the tokens before the block and the block's committed ones),
    MASK excluded; its confidence is its float32 probability under the
    distribution it was drawn from (without ``tempered_confidence``: under the
    model's, before temperature and filters).
    """
    mask_id, vocab = model.args.mask_token_id, model.args.vocab_size
    where = [
        (b, [i for i, t in enumerate(r.block) if t == mask_id])
        for b, r in enumerate(slots)
        if r is not None
    ]
    slot_index = mx.array([b for b, masked in where for _ in masked])
    column_index = mx.array([firsts[b] + i for b, masked in where for i in masked])
    logits = model.head(hidden[slot_index, column_index])
    rows = [slots[b] for b, masked in where for _ in masked]
    counts = None
    if any(r.sampling.penalized for r in rows):
        contexts = {
            b: token_counts(
                slots[b].seq[: slots[b].start] + [t for t in slots[b].block if t != mask_id],
                len(slots[b].prompt),
                vocab,
            )
            for b, _ in where
        }
        counts = mx.stack([contexts[b] for b, masked in where for _ in masked])
    samplings = [r.sampling for r in rows]
    adjusted = adjust_rows(logits, counts, samplings, mask_id)
    positions = [noise_position(slots[b], i) for b, masked in where for i in masked]
    if tempered_confidence:
        tokens, confidence = choose_rows(adjusted, samplings, positions, True)
    else:
        tokens = choose_rows(adjusted, samplings, positions)
        probs = mx.softmax(adjusted, axis=-1, precise=True)
        confidence = mx.take_along_axis(probs, tokens[:, None], axis=-1)[:, 0]
    report = read_report(logprob_report(adjusted, tokens, [r.settings.logprobs for r in rows]))
    tokens, confidence = tokens.tolist(), confidence.tolist()
    out, first = [], 0
    for b, masked in where:
        end, row = first + len(masked), slots[b]
        top = row.settings.logprobs
        logprobs = None
        if top is not None:
            logprobs = [token_logprob(report, j, tokens[j], top) for j in range(first, end)]
        out.append((row, masked, tokens[first:end], confidence[first:end], logprobs))
        first = end
    return out


def settle(
    row: "Row",
    masked: list[int],
    tokens: list[int],
    flags: list[bool],
    logprobs: Optional[list[TokenLogprob]],
    mask_id: int,
) -> Step:
    """Commit the flagged predictions into ``row``'s block (one more step, one more
    forward) and emit the final run at its front: the Step, with the block shown."""
    row.stats.forwards += 1
    row.stats.rounds += 1
    if len(row.committed) != len(row.block):
        row.committed = [None] * len(row.block)
        row.block_logprobs = [None] * len(row.block)
    for j, (i, token, flag) in enumerate(zip(masked, tokens, flags)):
        if flag:
            row.block[i] = token
            row.committed[i] = row.stats.rounds
            if logprobs is not None:
                row.block_logprobs[i] = logprobs[j]
    wanted = row.settings.max_tokens - row.stats.generated
    new = []
    while row.final < len(row.block) and row.block[row.final] != mask_id and len(new) < wanted:
        new.append(row.block[row.final])
        row.final += 1
    step = row.emit(
        row.settings.through_stop(new), row.block_logprobs[row.final - len(new) : row.final]
    )
    step.block, step.block_start = list(row.block), row.start
    step.committed = list(row.committed)
    return step
