"""RoPE frequencies of dhara: the theta formula, or YaRN when the config asks for it.

The checkpoint may carry its own per-layer ``inv_freq`` buffers; these functions
give the values a layer uses when it carries none, and the YaRN attention factor
that scales the rotated queries and keys.
"""

import math
from typing import Optional

import mlx.core as mx


def yarn_parameters(
    head_dim: int, theta: float, scaling: dict, max_position_embeddings: Optional[int]
) -> tuple[mx.array, float]:
    """YaRN inverse frequencies and attention factor (Peng et al., 2023).

    Keys and fallbacks as in Hugging Face configs: a missing
    ``original_max_position_embeddings`` is ``max_position_embeddings``; a missing
    ``factor`` is their ratio.
    """
    original = scaling.get("original_max_position_embeddings") or max_position_embeddings
    if original is None:
        raise ValueError(
            "config.json: rope_scaling of type yarn needs 'original_max_position_embeddings' "
            "(or max_position_embeddings)."
        )
    factor = scaling.get("factor")
    if factor is None:
        if max_position_embeddings is None:
            raise ValueError(
                "config.json: rope_scaling of type yarn needs 'factor' "
                "(or max_position_embeddings to derive it)."
            )
        factor = max_position_embeddings / original
    factor = float(factor)
    beta_fast = float(scaling.get("beta_fast") or 32.0)
    beta_slow = float(scaling.get("beta_slow") or 1.0)
    mscale = scaling.get("mscale")
    mscale_all_dim = scaling.get("mscale_all_dim")
    truncate = scaling.get("truncate", True)

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001

    exponents = mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim
    extrapolation = 1.0 / (theta**exponents)
    interpolation = 1.0 / (factor * theta**exponents)
    ramp = mx.clip((mx.arange(head_dim // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def rope_parameters(
    head_dim: int,
    theta: float,
    scaling: Optional[dict] = None,
    max_position_embeddings: Optional[int] = None,
) -> tuple[mx.array, float]:
    """Default inverse frequencies and attention factor for a config."""
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if kind in (None, "default"):
        return 1.0 / (theta ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim)), 1.0
    if kind == "yarn":
        return yarn_parameters(head_dim, theta, scaling, max_position_embeddings)
    raise ValueError(
        f"config.json: rope_scaling type {kind!r} is not supported by dhara; "
        "use no scaling or 'yarn'."
    )
