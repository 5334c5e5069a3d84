"""The joint loss dhara was trained with: next-token CE plus block-diffusion masked CE.

A noisy block is predicted from the clean blocks before it. Inference shows
those clean blocks to it in two ways: self-speculation drafts on top of the
causal cache (clean tokens causal), block diffusion runs the whole sequence under
the block-causal mask (each clean token also sees the rest of its block). Each
noisy block draws which of the two contexts it is trained with
(``block_context`` = the probability of the block-causal one), so both modes
are trained.

Two forwards:

1. the clean sequence under the causal mask gives the AR logits; every layer's
   keys, values and canon inputs are recorded. When ``block_context`` > 0 the
   batch holds each sequence twice, the second copy under the block-causal mask;
2. the noisy copy, cut into its blocks, one block per batch row: the row of
   block ``b`` attends to the recorded clean keys of blocks ``< b`` (of its
   context) and to its own block bidirectionally, its RoPE positions are the
   block's global positions, and its canon convs start from the recorded clean
   canon inputs just before the block.

Why not one forward over ``[clean ; noisy]`` (length 2L): canon convs are causal
over the sequence, so in the concatenation the first tokens of noisy block ``b``
would read the noisy tail of block ``b - 1`` (and noisy block 0 the end of the
clean copy) through every canon site, where inference reads the clean tokens
before the block. With four canon sites per layer the error spreads over a whole
block within a few layers. Feeding each block as its own row with the clean canon
history is exact, and costs the same token count as the concatenation (plus
the block-causal clean copy).
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn

from optiq_dhara.masks import block_causal_mask, causal_mask

BLOCK_LEN = 32
DIFFUSION_WEIGHT = 0.3
BLOCK_CONTEXT = 0.5
MIN_RATE = 1e-3


class Noise(NamedTuple):
    """A draw of the diffusion noise, per block of each sequence: the rate ``t``
    [B, blocks], which tokens are masked [B, L], and whether the block's clean
    context is block-causal [B, blocks] (else causal)."""

    rate: mx.array
    masked: mx.array
    block_context: mx.array


class Losses(NamedTuple):
    total: mx.array
    ar: mx.array
    diffusion: mx.array
    ar_tokens: mx.array
    diffusion_tokens: mx.array


def sample_noise(
    shape: tuple[int, int],
    block_len: int = BLOCK_LEN,
    min_rate: float = MIN_RATE,
    block_context: float = BLOCK_CONTEXT,
    key=None,
) -> Noise:
    """t ~ U(min_rate, 1) per block; each token masked with probability t of its block.

    ``min_rate`` keeps the 1/t weight finite. ``shape`` is [B, L] with L a
    multiple of ``block_len``.
    """
    batch, length = shape
    keys = mx.random.split(key, 3) if key is not None else (None, None, None)
    blocks = length // block_len
    rate = min_rate + (1 - min_rate) * mx.random.uniform(shape=(batch, blocks), key=keys[0])
    draws = mx.random.uniform(shape=(batch, length), key=keys[1])
    context = mx.random.uniform(shape=(batch, blocks), key=keys[2]) < block_context
    return Noise(rate, draws < mx.repeat(rate, block_len, axis=1), context)


@dataclass
class _CleanRecord:
    """Stands in for a layer cache in a clean forward: keeps keys, values, canon inputs."""

    offset: int = 0
    kv = None
    keys: Optional[mx.array] = None
    values: Optional[mx.array] = None
    canon: Optional[mx.array] = None

    def canon_valid(self, length: int, new: int):
        return None

    def canon_history(self, zeros: mx.array) -> tuple[mx.array]:
        return (zeros,)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self.keys, self.values = keys, values
        return keys, values

    def append_canon(self, history: tuple, inputs: tuple) -> None:
        """Keep ``inputs``; nothing is written, so the output waits on nothing new."""
        self.canon = mx.concatenate(inputs, axis=-1)


def _record(model: nn.Module, tokens: mx.array, mask) -> tuple[mx.array, list[_CleanRecord]]:
    records = [_CleanRecord() for _ in model.layers]
    return model(tokens, cache=records, mask=mask), records


class _BlockPrefix:
    """Stands in for a layer cache in the noisy forward (rows = (sequence, block)).

    Row ``(i, b)`` continues sequence ``i`` after its first ``b`` clean blocks: RoPE
    offset ``b * block_len``, canon history = the clean canon inputs just before
    the block, keys = all clean keys (the mask hides those of blocks >= b). The
    record holds the B causal rows, then (with ``use_block`` [rows]) B
    block-causal rows, from which the rows marked in ``use_block`` read.
    """

    kv = None

    def __init__(self, record: _CleanRecord, batch: int, use_block, block_len: int):
        self.record, self.batch, self.use_block, self.block_len = (
            record,
            batch,
            use_block,
            block_len,
        )
        self.blocks = record.keys.shape[2] // block_len
        self.offset = mx.tile(mx.arange(self.blocks) * block_len, batch)

    def _per_row(self, clean: mx.array, rows) -> mx.array:
        """``rows(array)`` of the causal copy, or of the block-causal one where ``use_block``."""
        value = rows(clean[: self.batch])
        if self.use_block is None:
            return value
        select = self.use_block.reshape(-1, *([1] * (value.ndim - 1)))
        return mx.where(select, rows(clean[self.batch :]), value)

    def canon_valid(self, length: int, new: int):
        return None

    def canon_history(self, zeros: mx.array) -> tuple[mx.array]:
        """[rows, K-1, width] like ``zeros``: the clean canon inputs before each block."""
        length = zeros.shape[1]
        window = (mx.arange(self.blocks) * self.block_len)[:, None] + mx.arange(length)[None]

        def rows(canon: mx.array) -> mx.array:
            padded = mx.pad(canon, [(0, 0), (length, 0), (0, 0)])
            return padded[:, window].reshape(zeros.shape)

        return (self._per_row(self.record.canon, rows).astype(zeros.dtype),)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        def rows(clean: mx.array) -> mx.array:
            return mx.repeat(clean, self.blocks, axis=0)

        return (
            mx.concatenate([self._per_row(self.record.keys, rows), keys], axis=2),
            mx.concatenate([self._per_row(self.record.values, rows), values], axis=2),
        )

    def append_canon(self, history: tuple, inputs: tuple) -> None:
        """Nothing to keep: the clean record holds every canon input."""


def noisy_block_mask(length: int, block_len: int) -> mx.array:
    """[blocks, 1, block_len, length + block_len]: block b sees clean keys < b*B and itself."""
    blocks = length // block_len
    clean = mx.arange(length)[None, :] < (mx.arange(blocks) * block_len)[:, None]
    own = mx.ones((blocks, block_len), dtype=mx.bool_)
    rows = mx.concatenate([clean, own], axis=1)[:, None, None, :]
    return mx.broadcast_to(rows, (blocks, 1, block_len, length + block_len))


def _pad_to_blocks(tokens: mx.array, loss_mask: mx.array, block_len: int, pad_id: int):
    extra = -tokens.shape[1] % block_len
    if not extra:
        return tokens, loss_mask
    tokens = mx.pad(tokens, [(0, 0), (0, extra)], constant_values=pad_id)
    return tokens, mx.pad(loss_mask, [(0, 0), (0, extra)])


def require_joint(model: nn.Module, diffusion_weight: float) -> Optional[int]:
    """The MASK id the diffusion term needs (None when ``diffusion_weight`` is 0), or a
    ValueError, before any training, for a model without a MASK token (AR-only)."""
    if not diffusion_weight:
        return model.args.mask_token_id
    try:
        return model.args.require_mask(f"the joint objective (diffusion weight {diffusion_weight})")
    except ValueError as exc:
        raise ValueError(
            f"{exc} To train the model as it is, use the AR objective: --objective ar "
            "(dhara-mlx lora) or --diffusion-weight 0 (dhara-mlx train)."
        ) from None


def ar_loss(logits: mx.array, tokens: mx.array, loss_mask: mx.array):
    """Mean next-token CE over the positions of ``loss_mask`` (from the second token on)."""
    weights = loss_mask[:, 1:].astype(mx.float32)
    ce = nn.losses.cross_entropy(logits[:, :-1].astype(mx.float32), tokens[:, 1:])
    count = weights.sum()
    return (ce * weights).sum() / mx.maximum(count, 1), count


def joint_loss(
    model: nn.Module,
    tokens: mx.array,
    loss_mask: Optional[mx.array] = None,
    diffusion_weight: float = DIFFUSION_WEIGHT,
    block_len: int = BLOCK_LEN,
    noise: Optional[Noise] = None,
    block_context: float = BLOCK_CONTEXT,
) -> Losses:
    """AR CE + ``diffusion_weight`` x block-diffusion CE of ``tokens`` [B, L].

    ``loss_mask`` [B, L] marks the tokens that are trained on (the completion,
    not the prompt or padding); only those are noised. The diffusion term is
    sum over masked tokens of CE / t, divided by the number of trained tokens.
    Sequences are padded with MASK to whole blocks. With ``diffusion_weight`` 0
    only the causal forward runs; with ``block_context`` 0 there is no
    block-causal clean copy (a given ``noise`` must then mark no block for one).
    ``noise`` is drawn when not given; its shapes follow the padded tokens.
    """
    if loss_mask is None:
        loss_mask = mx.ones(tokens.shape, dtype=mx.bool_)
    if diffusion_weight:
        mask_id = require_joint(model, diffusion_weight)
        tokens, loss_mask = _pad_to_blocks(tokens, loss_mask, block_len, mask_id)
    batch, length = tokens.shape
    clean, attend = tokens, "causal"
    if diffusion_weight and block_context > 0:
        clean = mx.concatenate([tokens, tokens])
        contexts = mx.stack([causal_mask(length), block_causal_mask(length, block_len)])
        attend = mx.repeat(contexts, batch, axis=0)[:, None]
    logits, records = _record(model, clean, attend)
    ar, ar_tokens = ar_loss(logits[:batch], tokens, loss_mask)
    if not diffusion_weight:
        zero = mx.array(0.0)
        return Losses(ar, ar, zero, ar_tokens, zero)

    if noise is None:
        noise = sample_noise(tokens.shape, block_len, block_context=block_context)
    use_block = noise.block_context.reshape(-1) if block_context > 0 else None
    prefixes = [_BlockPrefix(record, batch, use_block, block_len) for record in records]
    masked = noise.masked & loss_mask
    noisy = mx.where(masked, mask_id, tokens)
    attention = mx.tile(noisy_block_mask(length, block_len), (batch, 1, 1, 1))
    rows = model(noisy.reshape(-1, block_len), cache=prefixes, mask=attention)
    ce = nn.losses.cross_entropy(rows.astype(mx.float32), tokens.reshape(-1, block_len))
    weight = masked.astype(mx.float32) / mx.repeat(noise.rate, block_len, axis=1)
    diffusion_tokens = loss_mask.astype(mx.float32).sum()
    diffusion = (ce.reshape(batch, -1) * weight).sum() / mx.maximum(diffusion_tokens, 1)
    return Losses(ar + diffusion_weight * diffusion, ar, diffusion, ar_tokens, diffusion_tokens)
