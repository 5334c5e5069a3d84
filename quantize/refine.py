"""Refine a quantized model after allocation with mlx-lm's DWQ (distilled weight quantization).

The allocation decides each module's bits; the rounding (``quantize.rounding``) then
fixes each group's affine grid (scale and bias). DWQ trains those scales and biases, of every
module below 8 bits, so the quantized model's next-token distributions match the
float model's on the calibration text (KL at temperature 2, mlx-lm's
``dwq_quantize``). Bits, group sizes and packed weights stay as allocated, so the
size does not change.

On the CPU, training runs in float32 with each quantized matmul as dequantize +
float matmul: MLX's CPU quantized matmul is about 20x slower than BLAS on the
dequantized weights, and bfloat16 matmuls have no BLAS path; the trained values
are then cast back to the model's dtypes. On a GPU mlx-lm's DWQ runs as it is
(quantized matmuls, bfloat16).
"""

import time
from contextlib import contextmanager, nullcontext
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optimizers
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.quant.dwq import dwq_quantize

REFINEMENTS = ("none", "dwq")
DWQ_EPOCHS = 1
DWQ_LEARNING_RATE = 1e-4
DWQ_BATCH_SIZE = 4


def _dequantized(module) -> mx.array:
    return mx.dequantize(
        module["weight"],
        module["scales"],
        module.get("biases"),
        group_size=module.group_size,
        bits=module.bits,
        mode=module.mode,
    )


class _FloatMatmulLinear(nn.QuantizedLinear):
    """A QuantizedLinear that multiplies by its dequantized weight (same parameters)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ _dequantized(self).T
        return y + self["bias"] if "bias" in self else y


class _FloatMatmulEmbedding(nn.QuantizedEmbedding):
    """A QuantizedEmbedding whose tied head multiplies by its dequantized weight."""

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ _dequantized(self).T


FLOAT_MATMUL = {
    nn.QuantizedLinear: _FloatMatmulLinear,
    nn.QuantizedEmbedding: _FloatMatmulEmbedding,
}


@contextmanager
def float32_float_matmuls(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in float32 with float matmuls inside; its dtypes and classes restored after."""
    dtypes = {k: v.dtype for k, v in tree_flatten(model.parameters())}
    swapped = [(m, type(m)) for _, m in model.named_modules() if type(m) in FLOAT_MATMUL]
    model.update(
        tree_map(
            lambda v: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v,
            model.parameters(),
        )
    )
    for module, cls in swapped:
        module.__class__ = FLOAT_MATMUL[cls]
    try:
        yield model
    finally:
        for module, cls in swapped:
            module.__class__ = cls
        flat = [(k, v.astype(dtypes[k])) for k, v in tree_flatten(model.parameters())]
        model.update(tree_unflatten(flat))
        mx.eval(model.parameters())


def _rows(tokens: mx.array, count: int) -> list[tuple[list[int], int]]:
    """``tokens`` [N, L] as mlx-lm dataset rows (tokens, offset), cycled to ``count`` rows."""
    return [(tokens[i % tokens.shape[0]].tolist(), 0) for i in range(count)]


def dwq_refine(
    model: nn.Module,
    reference: nn.Module,
    calibration: mx.array,
    valid: mx.array,
    *,
    epochs: int = DWQ_EPOCHS,
    learning_rate: float = DWQ_LEARNING_RATE,
    batch_size: int = DWQ_BATCH_SIZE,
    seed: int = 0,
) -> dict:
    """Train ``model``'s quantized scales and biases (modules below 8 bits) to match ``reference``.

    ``model``: quantized in place, only its scales and biases change.
    ``reference``: the float model (the teacher, called as ``reference(tokens)``).
    ``calibration`` [N, L]: the training tokens, ``epochs`` passes over them;
    ``valid`` [M, L]: the tokens mlx-lm's validation loss (before and after) uses.
    Returns what ran: steps, samples, learning rate, seconds.
    """
    if epochs < 1 or learning_rate <= 0:
        raise ValueError(
            f"DWQ needs epochs >= 1 and a positive learning rate; got {epochs}, {learning_rate}"
        )
    started = time.perf_counter()
    samples = calibration.shape[0]
    batch_size = min(batch_size, samples)
    train = _rows(calibration, samples * epochs)
    valid_rows = _rows(valid, max(valid.shape[0], batch_size))
    model.freeze()  # dwq_quantize unfreezes the scales and biases it trains
    on_cpu = mx.default_device() == mx.cpu
    with float32_float_matmuls(model) if on_cpu else nullcontext(model):
        dwq_quantize(
            model,
            lambda batch, step, split: reference(batch),
            optimizers.Adam(learning_rate=learning_rate, bias_correction=True),
            train,
            valid_rows,
            batch_size=batch_size,
            max_seq_length=calibration.shape[1] + 1,
            seed=seed,
            dtype=mx.float32 if on_cpu else mx.bfloat16,
        )
    model.eval()
    return {
        "method": "dwq",
        "epochs": epochs,
        "samples": samples,
        "steps": len(train) // batch_size,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seconds": time.perf_counter() - started,
    }
