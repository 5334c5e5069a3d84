"""Log-likelihood of a continuation given a context, in AR or block-diffusion mode.

A request is a pair of token lists ``(context, continuation)``; its score is the
sum of the continuation's log-probabilities and whether every continuation token
is the model's top choice (lm-eval's ``(logprob, is_greedy)``).

AR: one causal forward over ``context + continuation[:-1]``; the logits at
position p score the token at p + 1 (full-vocabulary softmax).

Diffusion: the continuation is cut into chunks of ``block_len`` tokens from its
first token on, the chunks the block-diffusion decoder fills one after another.
Each chunk is scored by one forward over ``context + earlier chunks (their true
tokens) + the chunk replaced by MASK`` under the global block-causal mask; the
logits at a MASK position score the token of that position, with the MASK id
left out of the softmax as the decoder leaves it out. That is the distribution
the decoder's first denoising step of the chunk assigns to the true tokens: all
of them masked at once, predicted together from what precedes them. See
docs/evaluation.md.

Requests are batched by length with right padding, and requests with identical
inputs share a forward. Padding never reaches a real token: canon convs and the
causal mask only look back, and the block-causal mask is cut to each row's own
length.
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from optiq_dhara.masks import block_causal_mask

MODES = ("ar", "diffusion")
PAD_ID = 0


@dataclass(frozen=True)
class Row:
    """One forward's worth of a request: the inputs and which positions score what."""

    request: int
    inputs: list[int]
    start: int  # positions start .. start + len(targets) - 1 are scored
    targets: list[int]


def causal_rows(pairs: Sequence[tuple[list[int], list[int]]], max_length: int) -> list[Row]:
    """One row per request; contexts longer than the window lose their first tokens."""
    rows = []
    for i, (context, continuation) in enumerate(pairs):
        _check(i, context, continuation, max_length)
        if not context:
            raise ValueError(f"request {i}: AR scoring needs at least one context token.")
        inputs = (context + continuation)[-(max_length + 1) :][:-1]
        rows.append(Row(i, inputs, len(inputs) - len(continuation), list(continuation)))
    return rows


def diffusion_rows(
    pairs: Sequence[tuple[list[int], list[int]]],
    max_length: int,
    block_len: int,
    mask_id: int,
) -> list[Row]:
    """One row per ``block_len`` chunk of each continuation (see the module doc)."""
    if block_len < 1:
        raise ValueError(f"block_len must be >= 1, got {block_len}.")
    rows = []
    for i, (context, continuation) in enumerate(pairs):
        _check(i, context, continuation, max_length)
        tokens = (context + continuation)[-max_length:]
        first = len(tokens) - len(continuation)
        for lo in range(first, len(tokens), block_len):
            hi = min(lo + block_len, len(tokens))
            rows.append(Row(i, tokens[:lo] + [mask_id] * (hi - lo), lo, tokens[lo:hi]))
    return rows


def _check(i: int, context: list[int], continuation: list[int], max_length: int) -> None:
    if not continuation:
        raise ValueError(f"request {i}: the continuation is empty; nothing to score.")
    if len(continuation) > max_length:
        raise ValueError(
            f"request {i}: the continuation has {len(continuation)} tokens, more than "
            f"max_length {max_length}; raise max_length."
        )


def padded_block_causal_mask(lengths: Sequence[int], block_len: int) -> mx.array:
    """[B, 1, L, L] block-causal mask whose keys stop at each row's own length."""
    length = max(lengths)
    real = mx.arange(length)[None, :] < mx.array(lengths)[:, None]
    return block_causal_mask(length, block_len)[None, None] & real[:, None, None, :]


def score_rows(
    model,
    rows: Sequence[Row],
    *,
    batch_size: int = 1,
    block_len: Optional[int] = None,
    exclude_id: Optional[int] = None,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """(log-probability, all-greedy) of each row, in the order given.

    ``block_len`` None means the causal mask; otherwise the block-causal one.
    ``exclude_id`` is a token left out of the softmax and the argmax. Rows with
    the same inputs and scored positions share one forward: the choices of a
    question whose answers are one token (AR), or of one length (diffusion).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    groups: dict[tuple, list[int]] = {}
    for r, row in enumerate(rows):
        groups.setdefault((tuple(row.inputs), row.start), []).append(r)
    keys = sorted(groups, key=lambda key: -len(key[0]))
    batches = [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]
    results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
    for batch in tqdm(batches, desc="scoring", unit="batch", disable=not progress):
        members = [(u, r) for u, key in enumerate(batch) for r in groups[key]]
        scores, greedy = _score_batch(
            model,
            [rows[groups[key][0]] for key in batch],
            [u for u, _ in members],
            [rows[r].targets for _, r in members],
            block_len,
            exclude_id,
        )
        for (_, r), score, top in zip(members, scores, greedy):
            results[r] = (score, top)
    return results


def _score_batch(
    model, rows: Sequence[Row], owners: list[int], targets: list, block_len, exclude_id
):
    """One forward over ``rows``; scores of each target list against its owner row."""
    lengths = [len(row.inputs) for row in rows]
    width = max(len(row.targets) for row in rows)
    inputs = np.full((len(rows), max(lengths)), PAD_ID, np.int32)
    positions = np.zeros((len(rows), width), np.int32)
    for b, row in enumerate(rows):
        inputs[b, : lengths[b]] = row.inputs
        positions[b, : len(row.targets)] = np.arange(row.start, row.start + len(row.targets))
    wanted = np.zeros((len(targets), width), np.int32)
    scored = np.zeros((len(targets), width), bool)
    for m, tokens in enumerate(targets):
        wanted[m, : len(tokens)] = tokens
        scored[m, : len(tokens)] = True
    mask = None if block_len is None else padded_block_causal_mask(lengths, block_len)
    logits = model(mx.array(inputs), mask=mask)
    logits = logits[mx.arange(len(rows))[:, None], mx.array(positions)].astype(mx.float32)
    if exclude_id is not None:
        logits[..., exclude_id] = -mx.inf
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    owner, wanted, scored = mx.array(owners)[:, None], mx.array(wanted), mx.array(scored)
    picked = logprobs[owner, mx.arange(width)[None, :], wanted]
    total = mx.where(scored, picked, 0.0).sum(axis=-1)
    top = mx.argmax(logits, axis=-1)[owner[:, 0]]
    greedy = mx.all(mx.logical_or(top == wanted, ~scored), axis=-1)
    return total.tolist(), greedy.tolist()


def loglikelihoods(
    model,
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    mode: str = "ar",
    batch_size: int = 1,
    block_len: int = 32,
    max_length: int = 2048,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """(log p(continuation | context), is_greedy) of each request, scored in ``mode``."""
    if mode == "ar":
        rows = causal_rows(pairs, max_length)
        scores = score_rows(model, rows, batch_size=batch_size, progress=progress)
    elif mode == "diffusion":
        mask_id = model.args.require_mask("diffusion scoring (eval --mode diffusion)")
        rows = diffusion_rows(pairs, max_length, block_len, mask_id)
        scores = score_rows(
            model,
            rows,
            batch_size=batch_size,
            block_len=block_len,
            exclude_id=mask_id,
            progress=progress,
        )
    else:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
    totals = [[0.0, True] for _ in pairs]
    for row, (score, greedy) in zip(rows, scores):
        totals[row.request][0] += score
        totals[row.request][1] = totals[row.request][1] and greedy
    return [(score, greedy) for score, greedy in totals]
