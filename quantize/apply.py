"""Quantize a model to a per-module plan, and describe the plan as mlx-lm reads it.

``config.json``'s ``"quantization"`` gets one entry per quantized module, so the
stock loader (``mlx_lm.utils.load_model``) gives each module exactly its bits
instead of inferring or defaulting them.
"""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from .rounding import DEFAULT_ROUNDING, check_rounding, quantize_weight

MODE = "affine"


def quantize_to_plan(
    model: nn.Module,
    plan: dict[str, int],
    group_sizes: dict[str, int],
    rounding: str = DEFAULT_ROUNDING,
) -> nn.Module:
    """Quantize, in place, each module named in ``plan`` to its bits and group size,
    each group rounded by ``rounding`` (``quantize.rounding``)."""
    check_rounding(rounding)
    modules = dict(model.named_modules())
    unknown = set(plan) - set(modules)
    if unknown:
        raise ValueError(f"the plan names modules the model lacks: {sorted(unknown)[:3]}")
    floats = {path: modules[path].weight for path in plan}

    def predicate(path: str, module: nn.Module):
        if path not in plan:
            return False
        return {"group_size": group_sizes[path], "bits": plan[path], "mode": MODE}

    nn.quantize(model, class_predicate=predicate)
    if rounding != "mlx":
        for path, module in model.named_modules():
            if path in plan:
                module.weight, module.scales, module.biases = quantize_weight(
                    floats[path], plan[path], group_sizes[path], rounding
                )
    return model


def quantization_config(plan: dict[str, int], group_sizes: dict[str, int]) -> dict:
    """The ``"quantization"`` entry of config.json: a default and one entry per module."""
    config = {"group_size": min(group_sizes.values()), "bits": min(plan.values()), "mode": MODE}
    for path, bits in sorted(plan.items()):
        config[path] = {"group_size": group_sizes[path], "bits": bits, "mode": MODE}
    return config


def _headers(directory: Path) -> dict[str, dict]:
    """The safetensors headers of ``directory``: name -> dtype, shape, data offsets."""
    headers = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        headers.update(header)
    return headers


def stored_plan(directory: Path, widths: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(bits, group size) of every module stored quantized, read from the tensor shapes.

    ``widths`` are the modules' float input widths: a packed weight
    [out, width * bits / 32] and its scales [out, width / group_size] give both.
    """
    headers = _headers(directory)
    found = {}
    for key, info in headers.items():
        if key.endswith(".scales"):
            path = key[: -len(".scales")]
            packed = headers[f"{path}.weight"]["shape"][-1]
            found[path] = (packed * 32 // widths[path], widths[path] // info["shape"][-1])
    return found


def stored_bytes(directory: Path) -> int:
    """Bytes of tensor data in the safetensors files of ``directory`` (headers excluded)."""
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for v in _headers(directory).values())


def as_float32(model: nn.Module) -> nn.Module:
    """Every float tensor upcast to float32, quantized ones dequantized: same values, exact math."""
    from mlx_lm.utils import dequantize_model

    model = dequantize_model(model)
    model.update(
        tree_map(
            lambda v: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v,
            model.parameters(),
        )
    )
    mx.eval(model.parameters())
    return model


def _quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    quantized = (nn.QuantizedLinear, nn.QuantizedEmbedding)
    return [(path, m) for path, m in model.named_modules() if isinstance(m, quantized)]


def module_bits(model: nn.Module) -> dict[str, int]:
    """Bits of each quantized module of a loaded model."""
    return {path: module.bits for path, module in _quantized_modules(model)}


def module_group_sizes(model: nn.Module) -> dict[str, int]:
    """Group size of each quantized module of a loaded model."""
    return {path: module.group_size for path, module in _quantized_modules(model)}


def float_tensors(model: nn.Module) -> dict[str, mx.Dtype]:
    """Dtype of every tensor that is not a quantized weight, scale or bias."""
    quantized = tuple(f"{p}." for p in module_bits(model))
    return {k: v.dtype for k, v in tree_flatten(model.parameters()) if not k.startswith(quantized)}
