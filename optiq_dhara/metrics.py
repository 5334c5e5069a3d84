"""How closely a model follows a reference model: mean KL, top-1 agreement, perplexity.

dhara predicts in two ways, and both are scored:

- ``"ar"``: a causal forward; position t predicts token t + 1.
- ``"diffusion"``: a block-causal forward (SPEC.md) over a copy of the tokens in
  which each block has some tokens replaced by MASK, at a rate drawn per block
  as in training; each masked position predicts its own token.

The MASK id is never a prediction in either mode (decoding removes it), so its
logit is dropped before the softmax. KL is KL(reference || model), averaged
over the scored positions. A model without a MASK token (AR-only) is scored in
``"ar"`` alone (``scoring_modes``).
"""

from dataclasses import dataclass
from typing import Literal, Optional

import mlx.core as mx
import numpy as np

from .masks import block_causal_mask

Mode = Literal["ar", "diffusion"]
MODES: tuple[Mode, ...] = ("ar", "diffusion")


def scoring_modes(args) -> tuple[Mode, ...]:
    """The modes a model (its ``args``) is scored in: diffusion needs its MASK token."""
    return tuple(mode for mode in MODES if mode in args.modes)


@dataclass(frozen=True)
class Scoring:
    """The inputs of one forward and the positions it is scored at.

    ``positions`` are flat indices into the [B * L] positions of ``inputs``;
    ``targets`` the token each of them should predict.
    """

    inputs: mx.array
    mask: Optional[mx.array]
    positions: mx.array
    targets: mx.array

    @property
    def size(self) -> int:
        return self.positions.size


def ar_scoring(tokens: mx.array, mask_token_id: Optional[int]) -> Scoring:
    """Causal forward over ``tokens`` [B, L]; every position but the last (and any
    that predicts MASK) is scored."""
    targets = np.array(tokens[:, 1:])
    rows, cols = np.nonzero(targets != (-1 if mask_token_id is None else mask_token_id))
    return Scoring(
        inputs=tokens,
        mask=None,
        positions=mx.array(rows * tokens.shape[1] + cols),
        targets=mx.array(targets[rows, cols]),
    )


def diffusion_scoring(
    tokens: mx.array, mask_token_id: int, block_len: int = 32, seed: int = 0
) -> Scoring:
    """Block-causal forward over ``tokens`` [B, L] with masked blocks.

    Each block (of each row) draws a rate t ~ U(0, 1) and masks each of its
    tokens with probability t, at least one; the draw is fixed by ``seed``.
    """
    clean = np.array(tokens)
    batch, length = clean.shape
    rng = np.random.default_rng(seed)
    block = np.arange(length) // block_len
    rates = rng.uniform(size=(batch, block[-1] + 1))
    masked = rng.uniform(size=(batch, length)) < rates[:, block]
    for start in range(0, length, block_len):
        stop = min(start + block_len, length)
        forced = rng.integers(start, stop, size=batch)
        masked[np.arange(batch), forced] = True
    masked &= clean != mask_token_id
    rows, cols = np.nonzero(masked)
    noisy = np.where(masked, mask_token_id, clean)
    return Scoring(
        inputs=mx.array(noisy),
        mask=block_causal_mask(length, block_len),
        positions=mx.array(rows * length + cols),
        targets=mx.array(clean[rows, cols]),
    )


def make_scoring(
    tokens: mx.array, mode: Mode, mask_token_id: Optional[int], block_len: int = 32, seed: int = 0
) -> Scoring:
    """The scoring of ``mode`` for ``tokens`` [B, L] (diffusion needs a MASK id)."""
    if mode == "ar":
        return ar_scoring(tokens, mask_token_id)
    if mode == "diffusion":
        if mask_token_id is None:
            raise ValueError("diffusion scoring needs the MASK token; the model has none.")
        return diffusion_scoring(tokens, mask_token_id, block_len, seed)
    raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")


def scored_log_probs(logits: mx.array, scoring: Scoring, mask_token_id: Optional[int]) -> mx.array:
    """Float32 log-probabilities [N, V] at the scored positions, MASK removed (if any)."""
    flat = logits.reshape(-1, logits.shape[-1])[scoring.positions].astype(mx.float32)
    if mask_token_id is not None:
        flat = flat + mx.where(mx.arange(flat.shape[-1]) == mask_token_id, -mx.inf, 0.0)
    return flat - mx.logsumexp(flat, axis=-1, keepdims=True)


def kl_divergence(reference_log_probs: mx.array, log_probs: mx.array) -> mx.array:
    """KL(reference || model) [N] of log-probability rows [N, V]."""
    p = mx.exp(reference_log_probs)
    terms = mx.where(p > 0, p * (reference_log_probs - log_probs), 0.0)
    return terms.sum(axis=-1)


def target_nll(log_probs: mx.array, targets: mx.array) -> mx.array:
    """Negative log-likelihood [N] of the targets."""
    return -mx.take_along_axis(log_probs, targets[:, None], axis=-1)[:, 0]


@dataclass(frozen=True)
class Agreement:
    """A model against a reference in one mode, over ``positions`` scored positions."""

    mode: str
    positions: int
    mean_kl: float
    top1_agreement: float
    perplexity: float
    reference_perplexity: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def compare(
    model,
    reference,
    tokens: mx.array,
    mode: Mode = "ar",
    *,
    mask_token_id: Optional[int] = None,
    block_len: int = 32,
    seed: int = 0,
    batch_size: int = 4,
) -> Agreement:
    """Score ``model`` against ``reference`` on ``tokens`` [B, L] in ``mode``.

    Both are called as ``m(inputs, mask=mask)`` and return logits [B, L, V].
    ``mask_token_id`` defaults to ``reference.args.mask_token_id``; diffusion
    scoring of a reference without one is refused before any forward.
    """
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [batch, length >= 2], got shape {tokens.shape}")
    if mask_token_id is None:
        if mode == "diffusion":
            mask_token_id = reference.args.require_mask("diffusion scoring")
        else:
            mask_token_id = reference.args.mask_token_id
    totals = np.zeros(4)
    count = 0
    for start in range(0, tokens.shape[0], batch_size):
        scoring = make_scoring(
            tokens[start : start + batch_size], mode, mask_token_id, block_len, seed + start
        )
        ref = scored_log_probs(reference(scoring.inputs, mask=scoring.mask), scoring, mask_token_id)
        out = scored_log_probs(model(scoring.inputs, mask=scoring.mask), scoring, mask_token_id)
        sums = mx.stack(
            [
                kl_divergence(ref, out).sum(),
                (out.argmax(axis=-1) == ref.argmax(axis=-1)).sum().astype(mx.float32),
                target_nll(out, scoring.targets).sum(),
                target_nll(ref, scoring.targets).sum(),
            ]
        )
        totals += np.array(sums, dtype=np.float64)
        count += scoring.size
    if count == 0:
        raise ValueError("no scored positions: the tokens are all MASK")
    kl, top1, nll, ref_nll = totals / count
    return Agreement(
        mode=mode,
        positions=count,
        mean_kl=float(kl),
        top1_agreement=float(top1),
        perplexity=float(np.exp(nll)),
        reference_perplexity=float(np.exp(ref_nll)),
    )
