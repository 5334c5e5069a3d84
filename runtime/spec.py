"""Self-speculation: the diffusion head drafts, the causal head verifies.

Each round is two forwards on the cached prefix: a draft forward over
``[anchor, MASK x (w-1)]`` under the global block grid (then trimmed away), and
a causal verify forward over ``[anchor, drafts]``. The AR token at every verified
position is drawn exactly as AR would draw it; a draft is accepted only while it
equals that token, so the output is AR's, token for token.
"""

from typing import Iterator

import mlx.core as mx

from .ar import finished, next_token, prefill_causal
from .forward import cache_length, forward, rollback
from .sampling import Sampling, adjust_logits, choose, presence, seen_tokens
from .settings import Settings
from .stats import Stats, Step


def draft(
    model,
    cache: list,
    anchor_seq: list[int],
    width: int,
    sampling: Sampling,
    settings: Settings,
    stats: Stats,
) -> list[int]:
    """``width - 1`` draft tokens after the anchor (the last token of ``anchor_seq``)."""
    args = model.args
    start = cache_length(cache)
    window = [anchor_seq[-1]] + [args.mask_token_id] * (width - 1)
    logits = forward(model, cache, window, settings.block_len)[1:]
    stats.forwards += 1
    rollback(cache, start)
    seen = seen_tokens(sampling, anchor_seq, args.vocab_size)
    adjusted = adjust_logits(logits, seen, sampling, args.mask_token_id)
    positions = range(len(anchor_seq), len(anchor_seq) + width - 1)
    return choose(adjusted, sampling, positions).tolist()


def verify(
    model, logits: mx.array, seq: list[int], drafts: list[int], sampling: Sampling
) -> list[int]:
    """The AR tokens after ``seq``: accepted drafts, then the next anchor.

    ``logits`` [len(drafts) + 1, vocab] are the causal predictions after the
    anchor and after each draft. Without a repetition penalty the AR tokens of
    all positions are drawn at once; with one, each depends on the tokens before it.
    """
    args = model.args
    if sampling.repetition_penalty == 1.0:
        adjusted = adjust_logits(logits, None, sampling, args.mask_token_id)
        predicted = choose(adjusted, sampling, range(len(seq), len(seq) + len(logits))).tolist()
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == predicted[accepted]:
            accepted += 1
        return predicted[: accepted + 1]
    tokens: list[int] = []
    for row in logits:
        seen = presence(seq + tokens, args.vocab_size)
        adjusted = adjust_logits(row[None], seen, sampling, args.mask_token_id)
        token = choose(adjusted, sampling, [len(seq) + len(tokens)]).item()
        tokens.append(token)
        if len(tokens) > len(drafts) or drafts[len(tokens) - 1] != token:
            break
    return tokens


def decode_spec(
    model, cache: list, seq: list[int], sampling: Sampling, settings: Settings, stats: Stats
) -> Iterator[Step]:
    if finished(seq, 0, settings, stats):
        yield Step([], stats)
        return
    logits = prefill_causal(model, cache, seq, stats)
    new = [next_token(model, logits, seq, sampling)]
    while True:
        seq.extend(new)
        stats.emitted(len(new))
        done = finished(seq, stats.generated, settings, stats)
        yield Step(new, stats)
        if done:
            return
        width = min(settings.k, settings.max_tokens - stats.generated)
        start = cache_length(cache)
        drafts = draft(model, cache, seq, width, sampling, settings, stats) if width > 1 else []
        logits = forward(model, cache, [seq[-1]] + drafts)
        stats.forwards += 1
        new = verify(model, logits, seq, drafts, sampling)
        rollback(cache, start + len(new))
        stats.rounds += 1
        stats.accepted_drafts += len(new) - 1
        new = settings.through_stop(new)
