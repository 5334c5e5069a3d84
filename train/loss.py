"""The joint loss dhara was trained with: next-token CE plus block-diffusion masked CE.

Two forwards, each over the batch's tokens once:

1. the clean sequence under the causal mask gives the AR logits, and every layer's
   keys, values and canon inputs are recorded;
2. the noisy copy, cut into its blocks, one block per batch row: the row of block
   ``b`` attends to the recorded clean keys of blocks ``< b`` and to its own block
   bidirectionally, its RoPE positions are the block's global positions, and its
   canon convs start from the recorded clean canon inputs just before the block.

Why not one forward over ``[clean ; noisy]`` (length 2L): canon convs are causal
over the sequence, so in the concatenation the first tokens of noisy block ``b``
would read the noisy tail of block ``b - 1`` (and noisy block 0 the end of the
clean copy) through every canon site, where inference reads the clean tokens
before the block. With four canon sites per layer the error spreads over a whole
block within a few layers. Feeding each block as its own row with the clean canon
history is exact, and costs the same token count as the concatenation.
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn

BLOCK_LEN = 32
DIFFUSION_WEIGHT = 0.3
MIN_RATE = 1e-3


class Noise(NamedTuple):
    """A draw of the diffusion noise: the rate ``t`` [B, blocks] and which tokens are masked [B, L]."""

    rate: mx.array
    masked: mx.array


class Losses(NamedTuple):
    total: mx.array
    ar: mx.array
    diffusion: mx.array
    ar_tokens: mx.array
    diffusion_tokens: mx.array


def sample_noise(
    shape: tuple[int, int], block_len: int = BLOCK_LEN, min_rate: float = MIN_RATE, key=None
) -> Noise:
    """t ~ U(min_rate, 1) per block; each token masked with probability t of its block.

    ``min_rate`` keeps the 1/t weight finite. ``shape`` is [B, L] with L a
    multiple of ``block_len``.
    """
    batch, length = shape
    keys = mx.random.split(key) if key is not None else (None, None)
    blocks = length // block_len
    rate = min_rate + (1 - min_rate) * mx.random.uniform(shape=(batch, blocks), key=keys[0])
    draws = mx.random.uniform(shape=(batch, length), key=keys[1])
    return Noise(rate, draws < mx.repeat(rate, block_len, axis=1))


@dataclass
class _CleanRecord:
    """Stands in for a layer cache in the clean forward: keeps keys, values, canon inputs."""

    batch: int
    offset: int = 0
    kv = None
    keys: Optional[mx.array] = None
    values: Optional[mx.array] = None
    canon: Optional[mx.array] = None

    def canon_valid(self, length: int, new: int):
        return None

    def canon_history(self, zeros: mx.array) -> mx.array:
        return zeros

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self.keys, self.values = keys, values
        return keys, values

    def append_canon(self, history: mx.array, inputs: mx.array) -> mx.array:
        self.canon = inputs
        return inputs


class _BlockPrefix:
    """Stands in for a layer cache in the noisy forward (rows = (sequence, block)).

    Row ``(i, b)`` continues sequence ``i`` after its first ``b`` clean blocks: RoPE
    offset ``b * block_len``, canon history = the clean canon inputs just before
    the block, keys = all clean keys (the mask hides those of blocks >= b).
    """

    kv = None

    def __init__(self, record: _CleanRecord, block_len: int):
        self.record, self.block_len = record, block_len
        self.blocks = record.keys.shape[2] // block_len
        self.offset = mx.tile(mx.arange(self.blocks) * block_len, record.batch)

    def canon_valid(self, length: int, new: int):
        return None

    def canon_history(self, zeros: mx.array) -> mx.array:
        """[rows, K-1, width] like ``zeros``: the clean canon inputs before each block."""
        length = zeros.shape[1]
        padded = mx.pad(self.record.canon, [(0, 0), (length, 0), (0, 0)])
        starts = mx.arange(self.blocks) * self.block_len
        history = padded[:, starts[:, None] + mx.arange(length)[None]]
        return history.reshape(zeros.shape).astype(zeros.dtype)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        clean_keys = mx.repeat(self.record.keys, self.blocks, axis=0)
        clean_values = mx.repeat(self.record.values, self.blocks, axis=0)
        return (
            mx.concatenate([clean_keys, keys], axis=2),
            mx.concatenate([clean_values, values], axis=2),
        )

    def append_canon(self, history: mx.array, inputs: mx.array) -> mx.array:
        return inputs


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
) -> Losses:
    """AR CE + ``diffusion_weight`` x block-diffusion CE of ``tokens`` [B, L].

    ``loss_mask`` [B, L] marks the tokens that are trained on (the completion,
    not the prompt or padding); only those are noised. The diffusion term is
    sum over masked tokens of CE / t, divided by the number of trained tokens.
    With ``diffusion_weight`` 0 only the clean forward runs. ``noise`` is drawn
    when not given; its shapes follow ``tokens`` padded to whole blocks.
    """
    if loss_mask is None:
        loss_mask = mx.ones(tokens.shape, dtype=mx.bool_)
    mask_id = model.args.mask_token_id
    if diffusion_weight:
        tokens, loss_mask = _pad_to_blocks(tokens, loss_mask, block_len, mask_id)
    batch = tokens.shape[0]
    records = [_CleanRecord(batch) for _ in model.layers]
    logits = model(tokens, cache=records, mask="causal")
    ar, ar_tokens = ar_loss(logits, tokens, loss_mask)
    if not diffusion_weight:
        zero = mx.array(0.0)
        return Losses(ar, ar, zero, ar_tokens, zero)

    if noise is None:
        noise = sample_noise(tokens.shape, block_len)
    masked = noise.masked & loss_mask
    noisy = mx.where(masked, mask_id, tokens)
    prefixes = [_BlockPrefix(record, block_len) for record in records]
    attention = mx.tile(noisy_block_mask(tokens.shape[1], block_len), (batch, 1, 1, 1))
    rows = model(noisy.reshape(-1, block_len), cache=prefixes, mask=attention)
    ce = nn.losses.cross_entropy(rows.astype(mx.float32), tokens.reshape(-1, block_len))
    weight = masked.astype(mx.float32) / mx.repeat(noise.rate, block_len, axis=1)
    diffusion_tokens = loss_mask.astype(mx.float32).sum()
    diffusion = (ce.reshape(batch, -1) * weight).sum() / mx.maximum(diffusion_tokens, 1)
    return Losses(ar + diffusion_weight * diffusion, ar, diffusion, ar_tokens, diffusion_tokens)
