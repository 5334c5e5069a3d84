"""The bits-per-weight budget: every stored bit over the float model's parameter count.

Stored bits are the quantized modules' packed weights, scales and biases plus
every float tensor (Canon, norms, ``inv_freq``) at its dtype; the parameter
count is the float model's (buffers excluded).
"""

import math
from dataclasses import dataclass

import mlx.nn as nn

from .modules import Grouping, Quantizable, float_bits, parameter_count, scale_bits


@dataclass(frozen=True)
class Budget:
    parameters: int
    fixed: int  # bits of the float tensors
    scale_bits: int
    low: int  # bits of the quantized modules, all at the fewest candidate bits
    high: int  # ... all at the most

    @classmethod
    def of(
        cls, model: nn.Module, modules: list[Quantizable], bits: tuple[int, ...], grouping: Grouping
    ) -> "Budget":
        sb = scale_bits(model)
        return cls(
            parameters=parameter_count(model),
            fixed=float_bits(model, [m.path for m in modules]),
            scale_bits=sb,
            low=sum(m.stored_bits(bits[0], grouping.of(m, bits[0]), sb) for m in modules),
            high=sum(m.stored_bits(bits[-1], grouping.of(m, bits[-1]), sb) for m in modules),
        )

    def bpw(self, module_bits: int) -> float:
        """Bits per weight when the quantized modules take ``module_bits``."""
        return (self.fixed + module_bits) / self.parameters

    def check(self, target_bpw: float) -> None:
        low, high = self.bpw(self.low), self.bpw(self.high)
        if not math.isfinite(target_bpw) or target_bpw < low:
            raise ValueError(
                f"target bpw {target_bpw} is below the cost of the lowest candidate: every "
                f"module at its fewest bits already takes {low:.3f} bits per weight"
            )
        if target_bpw > high:
            raise ValueError(
                f"target bpw {target_bpw} is above the cost of the highest candidate "
                f"({high:.3f} bits per weight with every module at its most bits): lower "
                "the target or add larger candidate bits"
            )

    def for_modules(self, target_bpw: float) -> int:
        """Bits left for the quantized modules under the target."""
        return math.floor(target_bpw * self.parameters) - self.fixed
