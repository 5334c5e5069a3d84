"""Bits per module under a bits-per-weight budget: the most KL saved for the extra bits.

Each module starts at its cheapest candidate; choosing more bits for it costs
extra stored bits and saves KL. Picking one choice per module to save the most
KL within the budget is a multiple-choice knapsack, solved exactly by dynamic
programming over the extra bits counted in units of 1/32768 of the room above
the cheapest choice (each cost rounded up, so the result always fits); the
greedy answer (upgrades by KL saved per bit, exact costs) is kept instead when
it saves more. The greedy alone is not enough: a large module (the embedding is
15% of dhara-250m) can save the most KL for the budget and still be skipped once
smaller upgrades have used the room it needs.

The cutoff reported with an allocation is the KL-per-bit ratio between the
upgrades taken and those left; modules whose ratios lie near it are the ones
whose choice a better sensitivity estimate could change.
"""

import math
from dataclasses import dataclass

import numpy as np

from .modules import Grouping, Quantizable

RESOLUTION = 1 << 15


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
    cutoff: float  # KL saved per bit between the upgrades taken and those left

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
    grouping: Grouping,
    scale_bits: int,
) -> dict[str, dict[int, tuple[int, float]]]:
    """(stored bits, KL) of every module at every candidate."""
    return {
        m.path: {
            b: (m.stored_bits(b, grouping.of(m, b), scale_bits), kl[m.path][b])
            for b in candidate_bits
        }
        for m in modules
    }


def allocate(
    points: dict[str, dict[int, tuple[int, float]]], budget: int, resolution: int = RESOLUTION
) -> Allocation:
    """Bits for every module, saving the most KL with stored bits summing to at most ``budget``."""
    cheapest = {path: min(p, key=lambda b: p[b][0]) for path, p in points.items()}
    spent = sum(points[path][b][0] for path, b in cheapest.items())
    if spent > budget:
        raise ValueError(f"the cheapest choice needs {spent} bits, over the budget of {budget}")
    room = budget - spent
    unit = max(1, math.ceil(room / resolution))
    capacity = room // unit
    options = {path: _upgrades(p, cheapest[path], unit) for path, p in points.items()}
    best = np.zeros(capacity + 1)
    picks = []
    for path, upgrades in options.items():
        new, pick = best.copy(), np.zeros(capacity + 1, np.int8)
        for index, (_, weight, saved) in enumerate(upgrades, 1):
            if weight > capacity:
                continue
            candidate = np.full(capacity + 1, -np.inf)
            candidate[weight:] = best[: capacity + 1 - weight] + saved
            better = candidate > new
            new[better], pick[better] = candidate[better], index
        best = new
        picks.append((path, pick))
    bits, left = dict(cheapest), capacity
    for path, pick in reversed(picks):
        if pick[left]:
            bits[path], weight, _ = options[path][pick[left] - 1]
            left -= weight
    bits = max(bits, _greedy(points, cheapest, room), key=lambda b: _saved(points, cheapest, b))
    stored = sum(points[path][b][0] for path, b in bits.items())
    return Allocation(bits, stored, _cutoff(points, bits))


def _saved(points, cheapest: dict[str, int], bits: dict[str, int]) -> float:
    return sum(points[p][cheapest[p]][1] - points[p][b][1] for p, b in bits.items())


def _greedy(points, cheapest: dict[str, int], room: int) -> dict[str, int]:
    """Hull steps in order of KL saved per bit, while they fit (exact costs, no rounding)."""
    bits = dict(cheapest)
    steps = sorted(
        (s for path, p in points.items() for s in hull_steps(path, p)),
        key=lambda s: s.ratio,
        reverse=True,
    )
    for step in steps:
        if bits[step.path] == step.low and step.cost <= room:
            bits[step.path] = step.high
            room -= step.cost
    return bits


def _upgrades(points: dict[int, tuple[int, float]], base: int, unit: int) -> list:
    """(bits, extra cost in units rounded up, KL saved) of each choice that saves KL."""
    cost0, kl0 = points[base]
    return [
        (bits, math.ceil((cost - cost0) / unit), kl0 - kl)
        for bits, (cost, kl) in sorted(points.items())
        if cost > cost0 and kl < kl0
    ]


def _cutoff(points: dict[str, dict[int, tuple[int, float]]], bits: dict[str, int]) -> float:
    """Geometric mean of the lowest ratio taken and the highest left, along the hulls."""
    taken, left = [], []
    for path, p in points.items():
        for step in hull_steps(path, p):
            (taken if bits[path] >= step.high else left).append(step.ratio)
    if not taken or not left:
        return min(taken) if taken else max(left, default=0.0)
    low, high = min(taken), max(left)
    return math.sqrt(max(low, 1e-300) * max(high, 1e-300))
