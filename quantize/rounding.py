"""How a group of weights is rounded to its bits: which scale and bias it stores.

MLX's affine quantization (``mx.quantize``) stretches each group's step so that
the larger-magnitude end of the group lands exactly on a level, with zero on the
grid. The plain min-max grid (step = range / (2^bits - 1), bias = the group's
minimum) spans the range with the finest step instead. Neither is better for every
group: on Gaussian weights in groups of 32, min-max stores them with 7% (4 bits) and
35% (8 bits) less squared error, MLX's grid with 15% less at 2 bits. A checkpoint
that was itself quantized min-max (llama.cpp's Q4_1 and Q5_1) is reproduced exactly
by the min-max grid at its group size, and only approximately by MLX's.

``"best"`` keeps, per group, whichever of the two grids stores the weights with the
smaller squared error (each group's levels are the nearest ones on its grid); the
result is MLX's own format (packed levels, one scale and one bias per group), so
every MLX loader reads it unchanged. ``"mlx"`` is ``mx.quantize`` as it is.
"""

import mlx.core as mx

ROUNDINGS = ("best", "mlx")
DEFAULT_ROUNDING = "best"
WORD = 32  # bits per packed word


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding {rounding!r} is not one of {', '.join(ROUNDINGS)}")
    return rounding


def pack(levels: mx.array, bits: int) -> mx.array:
    """Levels [..., n] (n a multiple of 32) as MLX packs them: one little-endian bit
    stream per row, ``bits`` bits a level, in uint32 words [..., n * bits / 32]."""
    *lead, n = levels.shape
    levels = levels.astype(mx.uint32).reshape(*lead, n // WORD, WORD)
    words: list[list[mx.array]] = [[] for _ in range(bits)]
    for i in range(WORD):
        word, offset = divmod(i * bits, WORD)
        value = levels[..., i]
        words[word].append(value << offset)
        if offset + bits > WORD:
            words[word + 1].append(value >> (WORD - offset))
    packed = []
    for parts in words:
        total = parts[0]
        for part in parts[1:]:
            total = total | part
        packed.append(total)
    return mx.stack(packed, axis=-1).reshape(*lead, n * bits // WORD)


def _minmax(weight: mx.array, bits: int, group_size: int):
    """(packed, scales, biases) on each group's min-max grid, in ``mx.quantize``'s format."""
    rows = weight.shape[0]
    groups = weight.astype(mx.float32).reshape(rows, -1, group_size)
    low, high = groups.min(axis=-1), groups.max(axis=-1)
    scales = ((high - low) / (2**bits - 1)).astype(weight.dtype)
    biases = low.astype(weight.dtype)
    step = mx.where(scales == 0, 1, scales).astype(mx.float32)[..., None]
    levels = mx.round((groups - biases.astype(mx.float32)[..., None]) / step)
    levels = mx.clip(levels, 0, 2**bits - 1).reshape(weight.shape)
    return pack(levels, bits), scales, biases


def _group_error(weight: mx.array, stored: tuple, bits: int, group_size: int) -> mx.array:
    """Squared error [rows, groups] of ``stored`` (packed, scales, biases) as MLX reads it."""
    back = mx.dequantize(*stored, group_size=group_size, bits=bits).astype(mx.float32)
    error = (back - weight.astype(mx.float32)).square()
    return error.reshape(weight.shape[0], -1, group_size).sum(axis=-1)


def quantize_weight(
    weight: mx.array, bits: int, group_size: int, rounding: str = DEFAULT_ROUNDING
) -> tuple[mx.array, mx.array, mx.array]:
    """(packed weight, scales, biases) of ``weight`` [out, in] as ``mx.quantize`` returns
    them; scales and biases in the weight's dtype."""
    check_rounding(rounding)
    plain = mx.quantize(weight, group_size=group_size, bits=bits)
    if rounding == "mlx":
        return plain
    minmax = _minmax(weight, bits, group_size)
    take = _group_error(weight, minmax, bits, group_size) < _group_error(
        weight, plain, bits, group_size
    )
    rows, groups = take.shape
    words = (minmax[0].reshape(rows, groups, -1), plain[0].reshape(rows, groups, -1))
    packed = mx.where(take[..., None], *words).reshape(rows, -1)
    return packed, mx.where(take, minmax[1], plain[1]), mx.where(take, minmax[2], plain[2])


def fake_quantize(
    weight: mx.array, bits: int, group_size: int, dtype: mx.Dtype, rounding: str = DEFAULT_ROUNDING
) -> mx.array:
    """``weight`` as stored at ``bits`` (in ``dtype``), back in the weight's dtype."""
    q, scales, biases = quantize_weight(weight.astype(dtype), bits, group_size, rounding)
    return mx.dequantize(q, scales, biases, group_size=group_size, bits=bits).astype(weight.dtype)
