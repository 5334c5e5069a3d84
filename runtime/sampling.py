"""Turning logits into tokens, identically in every decoding mode.

The randomness of a sampled token depends only on the seed and the token's
absolute position in the sequence, never on how many forwards came before. So
self-speculation, which verifies several positions in one forward, draws exactly
the token that AR would draw at each position, and a batch row draws what the
same prompt draws alone.
"""

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import mlx.core as mx

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Sampling:
    """How to pick a token from a distribution; temperature 0 is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.repetition_penalty <= 0:
            raise ValueError(
                f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}."
            )

    def with_seed(self) -> "Sampling":
        """A copy with a concrete seed: drawn from MLX's global generator when unset."""
        if self.seed is not None or self.greedy:
            return self
        return replace(self, seed=mx.random.randint(0, 1 << 31, shape=()).item())


def _mix64(x: int) -> int:
    """The splitmix64 finalizer: a bijective scramble of 64 bits."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def position_key(seed: int, position: int) -> mx.array:
    """The PRNG key of the token at absolute ``position`` under ``seed``."""
    return mx.random.key(_mix64(_mix64(seed & _MASK64) ^ position))


def presence(tokens: Sequence[int], vocab_size: int) -> mx.array:
    """[vocab] bool: which ids occur in ``tokens`` (the repetition-penalty context)."""
    seen = mx.zeros((vocab_size,), mx.bool_)
    if tokens:
        seen[mx.array(list(tokens))] = True
    return seen


def seen_tokens(sampling: Sampling, tokens: Sequence[int], vocab_size: int) -> Optional[mx.array]:
    """The presence of ``tokens`` when a repetition penalty is on, else None (nothing to do)."""
    return presence(tokens, vocab_size) if sampling.repetition_penalty != 1.0 else None


def adjust_logits(
    logits: mx.array, seen: Optional[mx.array], sampling: Sampling, mask_id: Optional[int]
) -> mx.array:
    """float32 logits with MASK suppressed (None: the model has none) and the
    repetition penalty applied.

    The penalty divides a seen token's positive logit and multiplies a negative
    one (``l/p if l > 0 else l*p``), once per token however often it was seen.
    """
    return adjust_rows(logits, seen, [sampling.repetition_penalty], mask_id)


def adjust_rows(
    logits: mx.array, seen: Optional[mx.array], penalties: Sequence[float], mask_id: Optional[int]
) -> mx.array:
    """``adjust_logits`` for rows [N, vocab] with a penalty each (or one for all).

    ``seen`` [N, vocab] (or broadcastable) holds each row's penalty context.
    """
    logits = logits.astype(mx.float32)
    if mask_id is not None:
        logits = mx.where(mx.arange(logits.shape[-1]) == mask_id, -mx.inf, logits)
    if seen is None or all(p == 1.0 for p in penalties):
        return logits
    if len(set(penalties)) == 1:
        p = penalties[0]
        return mx.where(seen, mx.where(logits > 0, logits / p, logits * p), logits)
    p = mx.array(list(penalties), mx.float32)[:, None]
    penalized = mx.where(logits > 0, logits / p, logits * p)
    return mx.where(seen & (p != 1.0), penalized, logits)


def log_softmax(x: mx.array) -> mx.array:
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def filtered_logprobs(logits: mx.array, sampling: Sampling) -> mx.array:
    """Log-probabilities at the temperature, after top-k, then top-p, then min-p.

    Filtered-out tokens get -inf; each filter sees the distribution left by the
    one before it. Requires temperature > 0.
    """
    logprobs = log_softmax(logits / sampling.temperature)
    vocab = logprobs.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth = mx.sort(logprobs, axis=-1)[..., vocab - sampling.top_k, None]
        logprobs = mx.where(logprobs >= kth, logprobs, -mx.inf)
    if sampling.top_p < 1.0:
        logprobs = log_softmax(logprobs)
        order = mx.argsort(-logprobs, axis=-1)
        ranked = mx.take_along_axis(logprobs, order, axis=-1)
        before = mx.cumsum(mx.exp(ranked), axis=-1) - mx.exp(ranked)
        keep_ranked = before < sampling.top_p
        keep = mx.put_along_axis(mx.zeros_like(keep_ranked), order, keep_ranked, axis=-1)
        logprobs = mx.where(keep, logprobs, -mx.inf)
    if sampling.min_p > 0.0:
        logprobs = log_softmax(logprobs)
        floor = logprobs.max(axis=-1, keepdims=True) + mx.log(mx.array(sampling.min_p))
        logprobs = mx.where(logprobs >= floor, logprobs, -mx.inf)
    return log_softmax(logprobs)


def gumbel_noise(seed: int, positions: Sequence[int], vocab_size: int) -> mx.array:
    """[len(positions), vocab] Gumbel noise, one independent draw per position."""
    return _noise([seed] * len(positions), positions, vocab_size)


def _noise(seeds: Sequence[int], positions: Sequence[int], vocab_size: int) -> mx.array:
    keys = [position_key(s, p) for s, p in zip(seeds, positions)]
    return mx.stack([mx.random.gumbel((vocab_size,), key=k) for k in keys])


def choose(logits: mx.array, sampling: Sampling, positions: Sequence[int]) -> mx.array:
    """Tokens [N] from adjusted logits [N, vocab], row i being the token at ``positions[i]``.

    Greedy is the argmax; otherwise the Gumbel-max draw from the filtered
    distribution with the noise of (seed, position).
    """
    return _draw(logits, sampling, [sampling.seed] * len(positions), positions)


def _draw(logits: mx.array, sampling: Sampling, seeds, positions, confidence: bool = False):
    if sampling.greedy:
        logprobs = logits
        tokens = mx.argmax(logits, axis=-1)
    else:
        logprobs = filtered_logprobs(logits, sampling)
        tokens = mx.argmax(logprobs + _noise(seeds, positions, logits.shape[-1]), axis=-1)
    if not confidence:
        return tokens
    probs = mx.softmax(logprobs, axis=-1, precise=True)
    return tokens, mx.take_along_axis(probs, tokens[:, None], axis=-1)[:, 0]


def choose_rows(
    logits: mx.array,
    samplings: Sequence[Sampling],
    positions: Sequence[int],
    confidence: bool = False,
):
    """``choose`` for rows [N, vocab] of different requests, row i with ``samplings[i]``.

    Every step of the computation is row by row, so a row's token is the one
    it gets alone. Rows whose settings differ only in their seed are drawn
    together. With ``confidence``, also each token's float32 probability under
    the distribution it was drawn from (the filtered one when sampling).
    """
    groups: dict[Sampling, list[int]] = {}
    for i, sampling in enumerate(samplings):
        groups.setdefault(replace(sampling, seed=None), []).append(i)
    parts, order = [], []
    for sampling, rows in groups.items():
        part = logits if len(groups) == 1 else logits[mx.array(rows)]
        seeds = [samplings[i].seed for i in rows]
        parts.append(_draw(part, sampling, seeds, [positions[i] for i in rows], confidence))
        order += rows
    if len(parts) == 1:
        return parts[0]
    inverse = [0] * len(order)
    for place, row in enumerate(order):
        inverse[row] = place
    inverse = mx.array(inverse)
    if not confidence:
        return mx.concatenate(parts)[inverse]
    tokens, probs = zip(*parts)
    return mx.concatenate(tokens)[inverse], mx.concatenate(probs)[inverse]
