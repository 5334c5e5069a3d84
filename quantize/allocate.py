"""Bits per module under a bits-per-weight budget: the most KL saved per extra bit.

Each module starts at its cheapest candidate. Its upgrades are the steps along the
lower convex hull of its (stored bits, KL) points, so their ratios (KL saved per
extra bit) fall; all modules' steps are taken in order of ratio while they fit.
This is the greedy solution of the multiple-choice knapsack, which is optimal up
to the last step that did not fit.
"""

import heapq
import math
from dataclasses import dataclass

from .modules import Quantizable


@dataclass(frozen=True)
class Step:
    """Raising one module from ``low`` to ``high`` bits."""

    path: str
    low: int
    high: int
    cost: int
    saved: float

    @property
    def ratio(self) -> float:
        return self.saved / self.cost


@dataclass(frozen=True)
class Allocation:
    bits: dict[str, int]
    stored_bits: int  # the quantized modules' bits
    cutoff: float  # KL saved per bit at the edge: steps above it were taken

    def margin(self, steps: list[Step]) -> float:
        """How far, in log ratio, a module's steps lie from the cutoff."""
        if not steps or self.cutoff <= 0:
            return math.inf
        return min(abs(math.log(max(s.ratio, 1e-300) / self.cutoff)) for s in steps)


def hull_steps(path: str, points: dict[int, tuple[int, float]]) -> list[Step]:
    """Upgrade steps of one module; ``points`` maps bits to (stored bits, KL)."""
    ordered = sorted(points.items(), key=lambda item: item[1][0])
    hull = [ordered[0]]
    for bits, (cost, kl) in ordered[1:]:
        if kl >= hull[-1][1][1]:
            continue  # costs more and saves nothing
        while len(hull) > 1:
            (_, (c0, k0)), (_, (c1, k1)) = hull[-2], hull[-1]
            if (k0 - k1) / (c1 - c0) > (k1 - kl) / (cost - c1):
                break
            hull.pop()
        hull.append((bits, (cost, kl)))
    return [
        Step(path, lo, hi, c_hi - c_lo, k_lo - k_hi)
        for (lo, (c_lo, k_lo)), (hi, (c_hi, k_hi)) in zip(hull, hull[1:])
    ]


def module_points(
    modules: list[Quantizable],
    kl: dict[str, dict[int, float]],
    candidate_bits: tuple[int, ...],
    group_size: int,
    scale_bits: int,
) -> dict[str, dict[int, tuple[int, float]]]:
    """(stored bits, KL) of every module at every candidate."""
    return {
        m.path: {
            b: (m.stored_bits(b, group_size, scale_bits), kl[m.path][b]) for b in candidate_bits
        }
        for m in modules
    }


def allocate(points: dict[str, dict[int, tuple[int, float]]], budget: int) -> Allocation:
    """Bits for every module whose stored bits sum to at most ``budget``."""
    bits = {path: min(p, key=lambda b: p[b][0]) for path, p in points.items()}
    spent = sum(points[path][b][0] for path, b in bits.items())
    if spent > budget:
        raise ValueError(f"the cheapest choice needs {spent} bits, over the budget of {budget}")
    steps = {path: hull_steps(path, p) for path, p in points.items()}
    heap = [(-s[0].ratio, path, 0) for path, s in steps.items() if s]
    heapq.heapify(heap)
    last_taken, first_skipped = math.inf, 0.0
    while heap:
        _, path, index = heapq.heappop(heap)
        step = steps[path][index]
        if spent + step.cost > budget:
            first_skipped = max(first_skipped, step.ratio)
            continue
        spent += step.cost
        bits[path] = step.high
        last_taken = min(last_taken, step.ratio)
        if index + 1 < len(steps[path]):
            heapq.heappush(heap, (-steps[path][index + 1].ratio, path, index + 1))
    if math.isinf(last_taken):
        cutoff = first_skipped
    elif first_skipped == 0:
        cutoff = last_taken
    else:
        cutoff = math.sqrt(last_taken * first_skipped)
    return Allocation(bits, spent, cutoff)
