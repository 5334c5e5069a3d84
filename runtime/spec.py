"""Self-speculation: the diffusion head drafts, the causal head verifies.

A round is two batched forwards on the rows' caches: a draft forward over
``[anchor, MASK x (w-1)]`` under each row's block grid (then rolled back), and a
causal verify forward over ``[anchor, drafts]``, built on the device from the
drafts without reading them. The AR token at every verified position is drawn
exactly as AR would draw it; a draft is accepted only while it equals that
token, so a row's output is AR's, token for token. Like AR, a row's cache holds
all its tokens but the last (the anchor).
"""

from typing import TYPE_CHECKING

import mlx.core as mx

from .ar import draw, row_counts
from .sampling import (
    TokenLogprob,
    adjust_logits,
    adjust_rows,
    choose,
    logprob_report,
    read_report,
    token_counts,
    token_logprob,
)
from .stats import Step

if TYPE_CHECKING:
    from .engine import Group, Row


def verify(model, logits: mx.array, row: "Row", drafts: list[int]) -> list[int]:
    """The AR tokens after ``row``'s with a penalty: accepted drafts, then the next
    anchor, each drawn with the tokens before it in the penalty's context.

    ``logits`` [len(drafts) + 1, vocab] are the causal predictions after the
    anchor and after each draft.
    """
    args, seq, sampling = model.args, row.seq, row.sampling
    tokens: list[int] = []
    for row_logits in logits:
        counts = token_counts(seq + tokens, len(row.prompt), args.vocab_size)
        adjusted = adjust_logits(row_logits[None], counts, sampling, args.mask_token_id)
        token = choose(adjusted, sampling, [len(seq) + len(tokens)]).item()
        tokens.append(token)
        if len(tokens) > len(drafts) or drafts[len(tokens) - 1] != token:
            break
    return tokens


def _repeat(rows: list, times: int) -> list:
    return [r for r in rows for _ in range(times)]


def spec_step(group: "Group") -> list[tuple["Row", Step]]:
    """One draft-verify round of every self-speculation row."""
    from .engine import padded, run_rows

    model, cache, slots = group.model, group.cache, group.rows
    mask_id = model.args.mask_token_id
    widths = [
        min(r.settings.k, r.settings.max_tokens - r.stats.generated) if r else 1 for r in slots
    ]
    width = max(widths)
    anchors = mx.array([[r.seq[-1] if r else 0] for r in slots])
    before = list(cache.lengths)
    drafts = mx.zeros((len(slots), width - 1), mx.int32)
    if width > 1:
        window = padded([[0] + [mask_id] * (w - 1) for w in widths])
        window = mx.concatenate([anchors, window[:, 1:]], axis=1)
        grids = [r.settings.block_len if r else 1 for r in slots]
        logits = model.head(run_rows(model, cache, window, widths, grids)[:, 1:])
        cache.commit(before)
        flat = logits.reshape(-1, logits.shape[-1])
        positions = [len(r.seq) + j if r else 0 for r in slots for j in range(width - 1)]
        counts = None
        if any(r and r.sampling.penalized for r in slots):
            counts = mx.repeat(row_counts(slots, model.args.vocab_size), width - 1, axis=0)
        drafts, _ = draw(model, flat, _repeat(slots, width - 1), positions, counts)
        drafts = drafts.reshape(len(slots), width - 1).astype(mx.int32)
    window = mx.concatenate([anchors.astype(mx.int32), drafts], axis=1)
    logits = model.head(run_rows(model, cache, window, widths, [1] * len(slots)))
    positions = [len(r.seq) + j if r else 0 for r in slots for j in range(width)]
    plain = [r if r and not r.sampling.penalized else None for r in slots]
    flat = logits.reshape(-1, logits.shape[-1])
    predicted, _ = draw(model, flat, _repeat(plain, width), positions)
    drafted, predicted = drafts.tolist(), predicted.reshape(len(slots), width).tolist()
    events, lengths = [], list(before)
    for b, row in enumerate(slots):
        if row is None:
            continue
        w = widths[b]
        row_drafts = drafted[b][: w - 1]
        if not row.sampling.penalized:
            accepted = 0
            while accepted < w - 1 and row_drafts[accepted] == predicted[b][accepted]:
                accepted += 1
            new = predicted[b][: accepted + 1]
        else:
            new = verify(model, logits[b, :w], row, row_drafts)
        lengths[b] = before[b] + len(new)
        stats = row.stats
        stats.forwards += 2 if w > 1 else 1
        stats.rounds += 1
        stats.accepted_drafts += len(new) - 1
        logprobs = None if row.settings.logprobs is None else _logprobs(model, row, logits[b], new)
        events.append((row, row.emit(row.settings.through_stop(new), logprobs)))
    cache.commit(lengths)
    return events


def _logprobs(model, row: "Row", logits: mx.array, new: list[int]) -> list[TokenLogprob]:
    """The TokenLogprobs of a round's ``new`` tokens from the verify ``logits``: each
    under the distribution AR draws it from (its penalty context included)."""
    counts = None
    if row.sampling.penalized:
        vocab, prompt = model.args.vocab_size, len(row.prompt)
        counts = mx.stack([token_counts(row.seq + new[:j], prompt, vocab) for j in range(len(new))])
    adjusted = adjust_rows(logits[: len(new)], counts, [row.sampling], model.args.mask_token_id)
    top = row.settings.logprobs
    report = read_report(logprob_report(adjusted, mx.array(new), [top]))
    return [token_logprob(report, j, token, top) for j, token in enumerate(new)]
