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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), by id

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether the tokens so far change the distribution (a penalty is on)."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

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
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2] (0 = off), got {getattr(self, name)}.")
        for token, bias in self.logit_bias:
            if token < 0 or not -100.0 <= bias <= 100.0:
                raise ValueError(
                    f"logit_bias maps token ids >= 0 to values in [-100, 100]; got {token}: {bias}."
                )

    def check_vocab(self, vocab_size: int) -> None:
        """A ValueError naming a ``logit_bias`` token id outside the vocabulary."""
        bad = [token for token, _ in self.logit_bias if token >= vocab_size]
        if bad:
            raise ValueError(
                f"logit_bias has token id {bad[0]} outside the vocabulary [0, {vocab_size})."
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


def token_counts(tokens: Sequence[int], prompt_length: int, vocab_size: int) -> mx.array:
    """[2, vocab] float32: how often each id occurs in the prompt (the first
    ``prompt_length`` of ``tokens``) and in the generated tokens after it, the
    context of the penalties."""
    counts = mx.zeros((2, vocab_size), mx.float32)
    if tokens:
        where = [0 if i < prompt_length else 1 for i in range(len(tokens))]
        counts = counts.at[mx.array(where), mx.array(list(tokens))].add(1.0)
    return counts


def with_tokens(counts: mx.array, tokens: mx.array) -> mx.array:
    """Counts [N, 2, vocab] after each row generated one more token, ``tokens`` [N]."""
    hot = (mx.arange(counts.shape[-1]) == tokens[:, None]).astype(mx.float32)
    return counts + mx.stack([mx.zeros_like(hot), hot], axis=1)


def adjust_logits(
    logits: mx.array, counts: Optional[mx.array], sampling: Sampling, mask_id: Optional[int]
) -> mx.array:
    """float32 logits after the penalties and ``logit_bias``, MASK suppressed (None: the
    model has none); ``counts`` [..., 2, vocab] as ``token_counts`` (None: no penalty).

    The repetition penalty divides the positive logit of a token seen in prompt or
    output and multiplies a negative one (``l/p if l > 0 else l*p``), once however
    often it was seen; then, as OpenAI defines them, each generated token's logit
    loses ``presence_penalty`` once and ``frequency_penalty`` per occurrence; then
    ``logit_bias`` is added.
    """
    return adjust_rows(logits, counts, [sampling], mask_id)


def adjust_rows(
    logits: mx.array,
    counts: Optional[mx.array],
    samplings: Sequence[Sampling],
    mask_id: Optional[int],
) -> mx.array:
    """``adjust_logits`` for rows [N, vocab] with a Sampling each (or one for all);
    ``counts`` [N, 2, vocab] (or broadcastable) holds each row's context."""
    logits = logits.astype(mx.float32)
    if counts is not None:
        logits = _penalize(logits, counts, samplings)
    if any(s.logit_bias for s in samplings):
        logits = logits + _bias(samplings, logits.shape[-1])
    if mask_id is not None:
        logits = mx.where(mx.arange(logits.shape[-1]) == mask_id, -mx.inf, logits)
    return logits


def _column(values: list[float]) -> mx.array:
    return mx.array(values, mx.float32)[:, None]


def _penalize(logits: mx.array, counts: mx.array, samplings: Sequence[Sampling]) -> mx.array:
    repetition = [s.repetition_penalty for s in samplings]
    if any(p != 1.0 for p in repetition):
        p = _column(repetition)
        seen = (counts.sum(axis=-2) > 0) & (p != 1.0)
        logits = mx.where(seen, mx.where(logits > 0, logits / p, logits * p), logits)
    presence = [s.presence_penalty for s in samplings]
    frequency = [s.frequency_penalty for s in samplings]
    if any(presence) or any(frequency):
        generated = counts[..., 1, :]
        logits = logits - _column(presence) * (generated > 0) - _column(frequency) * generated
    return logits


def _bias(samplings: Sequence[Sampling], vocab_size: int) -> mx.array:
    """[N, vocab] (or [1, vocab]) of each row's ``logit_bias``."""
    entries = [(i, t, b) for i, s in enumerate(samplings) for t, b in s.logit_bias]
    rows, tokens, values = zip(*entries)
    bias = mx.zeros((len(samplings), vocab_size), mx.float32)
    return bias.at[mx.array(rows), mx.array(tokens)].add(mx.array(values, mx.float32))


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
    groups: dict[tuple, list[int]] = {}  # by the settings the draw reads
    for i, s in enumerate(samplings):
        groups.setdefault((s.temperature, s.top_p, s.top_k, s.min_p), []).append(i)
    parts, order = [], []
    for rows in groups.values():
        sampling = samplings[rows[0]]
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


@dataclass
class TokenLogprob:
    """A generated token's log-probability and the ``top`` likeliest tokens at its
    position (id, log-probability), likeliest first.

    The distribution is the one the token was drawn from before temperature and
    the top-k/top-p/min-p filters: the model's, after the penalties and
    ``logit_bias`` (MASK excluded); for block diffusion, at the step that
    committed the token.
    """

    token: int
    logprob: float
    top: list[tuple[int, float]]


Report = tuple[mx.array, mx.array, mx.array]  # chosen [N], top ids [N, t], top values [N, t]


def logprob_report(adjusted: mx.array, tokens: mx.array, tops: Sequence[Optional[int]]):
    """The log-probabilities of ``tokens`` [N] under adjusted logits [N, vocab], and the
    most top alternatives any row asks for (``tops``: None = the row asks for no
    logprobs); None when no row asks (lazy arrays: nothing runs until read)."""
    wanted = [t for t in tops if t is not None]
    if not wanted:
        return None
    logprobs = log_softmax(adjusted)
    chosen = mx.take_along_axis(logprobs, tokens.reshape(-1, 1), axis=-1)[:, 0]
    width = min(max(wanted), logprobs.shape[-1])
    if width == 0:
        empty = mx.zeros((logprobs.shape[0], 0))
        return chosen, empty.astype(mx.int32), empty
    ids = mx.argpartition(-logprobs, kth=width - 1, axis=-1)[:, :width]
    return chosen, ids, mx.take_along_axis(logprobs, ids, axis=-1)


def token_logprob(report, index: int, token: int, top: int) -> TokenLogprob:
    """The TokenLogprob of row ``index`` of a read report (``read_report``) for
    ``token``, with its ``top`` likeliest alternatives."""
    chosen, ids, values = report
    ranked = sorted(zip(values[index], ids[index]), reverse=True)[:top]
    return TokenLogprob(token, chosen[index], [(t, v) for v, t in ranked])


def read_report(report: Optional[Report]):
    """``report``'s arrays as host lists (None stays None)."""
    return None if report is None else tuple(a.tolist() for a in report)
