"""What can be quantized in a dhara model, and what each choice costs in stored bits.

Every Linear and the token embedding (with a tied head it is the head too) are
quantizable, affine, along their input dimension in groups (``Grouping``). Everything else
(Canon convs, the norms including QK-norm, the RoPE ``inv_freq`` buffers) is
stored in float.
"""

from dataclasses import dataclass
from typing import Iterable, Optional

import mlx.nn as nn
from mlx.utils import tree_flatten

from .rounding import DEFAULT_ROUNDING, check_rounding

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
WIDE_GROUP_BITS = 8  # from these bits up, a module may take a wider group (``Grouping``)
BUFFERS = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Quantizable:
    """A module whose weight [out, in] can be stored quantized."""

    path: str
    shape: tuple[int, int]
    layer: Optional[int]  # decoder layer index; None for the embedding and lm_head

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def kind(self) -> str:
        """The path without its layer index: modules of one kind behave alike."""
        return ".".join(p for p in self.path.split(".") if not p.isdigit())

    def stored_bits(self, bits: int, group_size: int, scale_bits: int) -> int:
        """Packed weights plus one scale and one bias per group."""
        return self.numel * bits + 2 * (self.numel // group_size) * scale_bits


@dataclass(frozen=True)
class Grouping:
    """The group size of a module at given bits: ``size``, or wider from ``wide_bits`` up.

    At 8 bits the rounding error is a sixteenth of 4 bits', so storing such a
    module in the widest group its rows allow (up to 128) costs almost no KL and
    frees the bits of most of its scales and biases (0.75 bits per weight at
    group size 32 with bfloat16 scales) for upgrading other modules.
    ``wide_bits=None`` keeps ``size`` everywhere, as mlx-lm's recipes do.
    ``rounding`` picks each group's scale and bias (``rounding.ROUNDINGS``).
    """

    size: int
    wide_bits: Optional[int] = WIDE_GROUP_BITS
    rounding: str = DEFAULT_ROUNDING

    def __post_init__(self):
        check_rounding(self.rounding)

    @classmethod
    def choose(cls, size: int, wide: bool, rounding: str = DEFAULT_ROUNDING) -> "Grouping":
        """Wide groups from ``WIDE_GROUP_BITS`` up, or ``size`` everywhere."""
        return cls(size, WIDE_GROUP_BITS if wide else None, rounding)

    def of(self, module: Quantizable, bits: int) -> int:
        if self.wide_bits is None or bits < self.wide_bits:
            return self.size
        return max(g for g in SUPPORTED_GROUP_SIZES if g >= self.size and module.shape[1] % g == 0)

    def sizes(self, modules: Iterable[Quantizable], plan: dict[str, int]) -> dict[str, int]:
        """The group size of every module in ``plan`` at its planned bits."""
        return {m.path: self.of(m, plan[m.path]) for m in modules if m.path in plan}

    def as_dict(self) -> dict:
        return {
            "group_size": self.size,
            "wide_group_bits": self.wide_bits,
            "rounding": self.rounding,
        }


def _layer_index(path: str) -> Optional[int]:
    parts = path.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1])
    return None


def quantizable_modules(model: nn.Module) -> list[Quantizable]:
    """The modules of ``model`` that can be quantized, in model order."""
    found = []
    for path, module in model.named_modules()[::-1]:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            found.append(Quantizable(path, tuple(module.weight.shape), _layer_index(path)))
    return found


def check_candidates(candidate_bits: Iterable[int], group_size: int) -> tuple[int, ...]:
    """Sorted, distinct candidate bits; ValueError for what MLX cannot store."""
    bits = tuple(sorted(set(candidate_bits)))
    unknown = [b for b in bits if b not in SUPPORTED_BITS]
    if not bits or unknown:
        raise ValueError(
            f"candidate bits {list(candidate_bits)}: {unknown or 'none given'} not supported; "
            f"choose from {', '.join(map(str, SUPPORTED_BITS))}."
        )
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"group size {group_size} is not supported; choose from "
            f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}."
        )
    return bits


def check_group_size(modules: Iterable[Quantizable], group_size: int) -> None:
    """Every quantized row must split into whole groups."""
    bad = [m for m in modules if m.shape[1] % group_size]
    if bad:
        fits = [g for g in SUPPORTED_GROUP_SIZES if all(m.shape[1] % g == 0 for m in modules)]
        listed = ", ".join(f"{m.path} (width {m.shape[1]})" for m in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        hint = f"use --group-size {' or '.join(map(str, fits))}" if fits else "no group size fits"
        raise ValueError(
            f"group size {group_size} does not divide the input width of {listed}{more}; {hint}."
        )


def is_buffer(key: str) -> bool:
    return key.endswith(BUFFERS)


def parameter_count(model: nn.Module) -> int:
    """Parameters of the float model (buffers such as ``inv_freq`` excluded)."""
    return sum(v.size for k, v in tree_flatten(model.parameters()) if not is_buffer(k))


def float_bits(model: nn.Module, quantized: Iterable[str]) -> int:
    """Stored bits of every tensor outside the quantized modules, at its dtype."""
    prefixes = tuple(f"{path}." for path in quantized)
    return sum(
        v.size * v.dtype.size * 8
        for k, v in tree_flatten(model.parameters())
        if not k.startswith(prefixes)
    )


def scale_bits(model: nn.Module) -> int:
    """Bits of a quantization scale or bias: they take the float weights' dtype."""
    return model.model.embed_tokens.weight.dtype.size * 8
