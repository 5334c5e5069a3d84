"""Sensitivity of each quantizable module: the KL it costs when it alone is quantized.

KL(float || float with one module quantized) per scored position, on the
calibration tokens, in an AR and a block-diffusion forward (``optiq_dhara.metrics``),
averaged over the two modes.

Measuring every module exactly by full forwards costs about 2 x modules + 2
forwards per sample. Two things make it cheaper:

- reuse: the float residual stream entering every layer is kept, so quantizing
  a module of layer i only reruns layers i.. (``staged``);
- estimate, then measure where it decides (method ``"auto"``): one backward per
  sample and mode, with labels sampled from the float model, gives the diagonal
  Fisher information F of every weight, and KL ~ 0.5 * sum(F * dW^2) / positions
  for the quantization error dW at any bits. The estimates are corrected per
  module kind by the exact measurements and only the modules nearest the
  allocation's cutoff (where the estimate decides 4 or 8 bits) are measured
  exactly, within a forward budget (a tenth of the full-forward cost).

KL at the highest candidate is estimated in ``"auto"`` as the exact KL at the
next lower candidate times the estimated ratio; ``"exact"`` measures everything.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from optiq_dhara.metrics import (
    MODES,
    Scoring,
    kl_divergence,
    make_scoring,
    scored_log_probs,
    target_nll,
)

from .allocate import Allocation, allocate, hull_steps, module_points
from .modules import Quantizable
from .staged import ForwardCount, forward_from, forward_with_states, head

Method = Literal["auto", "exact"]
FORMAT = "optiq-dhara sensitivities v1"


def fake_quantize(weight: mx.array, bits: int, group_size: int, dtype: mx.Dtype) -> mx.array:
    """``weight`` as stored at ``bits`` (in ``dtype``), back in the weight's dtype."""
    stored = weight.astype(dtype)
    q, scales, biases = mx.quantize(stored, group_size=group_size, bits=bits)
    return mx.dequantize(q, scales, biases, group_size=group_size, bits=bits).astype(weight.dtype)


@dataclass
class Sensitivity:
    """KL of one module at each candidate bits, per mode and averaged."""

    by_mode: dict[str, dict[int, float]]
    measured: bool

    @property
    def kl(self) -> dict[int, float]:
        bits = next(iter(self.by_mode.values()))
        return {b: float(np.mean([m[b] for m in self.by_mode.values()])) for b in bits}

    def as_dict(self) -> dict:
        out = {"kl": _str_keys(self.kl), "measured": self.measured}
        out.update({mode: _str_keys(v) for mode, v in self.by_mode.items()})
        return out


def _str_keys(values: dict[int, float]) -> dict[str, float]:
    return {str(b): v for b, v in sorted(values.items())}


@dataclass
class Sensitivities:
    """All modules' sensitivities and how they were obtained."""

    modules: dict[str, Sensitivity]
    candidate_bits: tuple[int, ...]
    group_size: int
    method: str
    num_samples: int
    seq_len: int
    forwards_per_sample: float
    naive_forwards_per_sample: float
    extra: dict = field(default_factory=dict)

    def kl(self) -> dict[str, dict[int, float]]:
        return {path: s.kl for path, s in self.modules.items()}

    def as_dict(self) -> dict:
        return {
            "format": FORMAT,
            "kl": "mean KL(float || one module quantized) per scored position, AR and diffusion averaged",
            "candidate_bits": list(self.candidate_bits),
            "group_size": self.group_size,
            "method": self.method,
            "num_samples": self.num_samples,
            "seq_len": self.seq_len,
            "forwards_per_sample": self.forwards_per_sample,
            "naive_forwards_per_sample": self.naive_forwards_per_sample,
            "measured_exactly": sum(s.measured for s in self.modules.values()),
            **self.extra,
            "modules": {path: s.as_dict() for path, s in self.modules.items()},
        }

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.as_dict(), indent=2))


def load_sensitivities(
    path: Path, modules: list[Quantizable], candidate_bits: tuple[int, ...], group_size: int
) -> Sensitivities:
    """Read a sensitivities JSON and check it fits this model and these choices."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"sensitivities file {path} cannot be read: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"sensitivities file {path} is not a {FORMAT!r} file")
    if data["group_size"] != group_size:
        raise ValueError(
            f"sensitivities file {path} was measured at group size {data['group_size']}, "
            f"not {group_size}: pass --group-size {data['group_size']} or measure again"
        )
    missing_bits = sorted(set(candidate_bits) - set(data["candidate_bits"]))
    if missing_bits:
        raise ValueError(
            f"sensitivities file {path} has no KL for bits {missing_bits}; it has "
            f"{data['candidate_bits']}: measure again with these candidate bits"
        )
    stored = data["modules"]
    wanted = {m.path for m in modules}
    if set(stored) != wanted:
        odd = sorted(wanted ^ set(stored))
        raise ValueError(
            f"sensitivities file {path} does not match this model's modules "
            f"({len(odd)} differ, e.g. {odd[0]}): it was measured on another model"
        )
    sens = {
        p: Sensitivity(
            {mode: {b: v[mode][str(b)] for b in candidate_bits} for mode in MODES},
            v["measured"],
        )
        for p, v in stored.items()
    }
    return Sensitivities(
        sens,
        candidate_bits,
        group_size,
        data["method"],
        data["num_samples"],
        data["seq_len"],
        data["forwards_per_sample"],
        data["naive_forwards_per_sample"],
        {"reused_from": str(path)},
    )


class Calibrator:
    """The float model's view of the calibration tokens: what each KL is measured against.

    Keeps, per mode and batch, the scoring, the reference log-probabilities at the
    scored positions and the residual stream at every layer boundary.
    """

    def __init__(
        self,
        model: nn.Module,
        tokens: mx.array,
        *,
        dtype: mx.Dtype,
        group_size: int,
        block_len: int = 32,
        batch_size: int = 4,
        seed: int = 0,
    ):
        self.model = model
        self.dtype = dtype
        self.group_size = group_size
        self.mask_id = model.args.mask_token_id
        self.samples = tokens.shape[0]
        self.count = ForwardCount(len(model.layers))
        self.modules = dict(model.named_modules())
        self.batches = {
            mode: [
                make_scoring(tokens[s : s + batch_size], mode, self.mask_id, block_len, seed + s)
                for s in range(0, self.samples, batch_size)
            ]
            for mode in MODES
        }
        self.positions = {mode: sum(b.size for b in self.batches[mode]) for mode in MODES}
        self.reference: dict[str, list[mx.array]] = {mode: [] for mode in MODES}
        self.states: dict[str, list[list[mx.array]]] = {mode: [] for mode in MODES}

    def _keep(self, mode: str, log_probs: mx.array, states: list[mx.array]) -> None:
        mx.eval(log_probs, states)
        self.reference[mode].append(log_probs)
        self.states[mode].append(states)

    def capture(self) -> None:
        """One float forward per batch and mode."""
        for mode in MODES:
            for scoring in tqdm(self.batches[mode], desc=f"Float forwards ({mode})", leave=False):
                logits, states = forward_with_states(self.model, scoring.inputs, scoring.mask)
                self._keep(mode, scored_log_probs(logits, scoring, self.mask_id), states)
                self.count.forward(0, scoring.inputs.shape[0])

    def capture_with_fisher(self, modules: list[Quantizable], seed: int = 0) -> dict:
        """The float forwards, plus the diagonal Fisher of each module's weight per mode.

        One backward per sample of the log-likelihood of labels drawn from the
        float model at the scored positions; the squared gradient estimates the
        Fisher information (its expectation over the labels), divided here by
        the mode's scored positions.
        """
        model = self.model
        model.freeze()
        for m in modules:
            self.modules[m.path].unfreeze(keys=["weight"])
        key = mx.random.key(seed)
        fisher = {}
        bar = tqdm(total=self.samples * len(MODES), desc="Float forwards + Fisher", leave=False)
        for mode in MODES:
            total = {m.path: mx.zeros(m.shape, mx.float32) for m in modules}
            for scoring in self.batches[mode]:
                parts, states_parts = [], []
                for row in range(scoring.inputs.shape[0]):
                    key, sub = mx.random.split(key)
                    one = _row(scoring, row)
                    (_, (lp, states)), grads = nn.value_and_grad(model, self._loglik)(one, sub)
                    grads = dict(tree_flatten(grads))
                    for m in modules:
                        total[m.path] = total[m.path] + grads[f"{m.path}.weight"].square()
                    mx.eval(lp, states, total)
                    parts.append(lp)
                    states_parts.append(states)
                    self.count.forward(0)
                    self.count.backward()
                    bar.update()
                self._keep(
                    mode,
                    mx.concatenate(parts),
                    [mx.concatenate(s) for s in zip(*states_parts)],
                )
            fisher[mode] = {p: f / self.positions[mode] for p, f in total.items()}
        bar.close()
        model.unfreeze()
        return fisher

    def _loglik(self, scoring: Scoring, key: mx.array):
        logits, states = forward_with_states(self.model, scoring.inputs, scoring.mask)
        lp = scored_log_probs(logits, scoring, self.mask_id)
        labels = mx.random.categorical(mx.stop_gradient(lp), key=key)
        loss = target_nll(lp, labels).sum()
        return loss, (mx.stop_gradient(lp), [mx.stop_gradient(s) for s in states])

    def start(self, module: Quantizable) -> int:
        """The first layer a module's quantization changes (0 for the embedding)."""
        if module.layer is not None:
            return module.layer
        return 0 if module.path.endswith("embed_tokens") else len(self.model.layers)

    def exact_kl(self, module: Quantizable, bits: int) -> dict[str, float]:
        """Mean KL per mode with ``module`` alone quantized to ``bits``."""
        target = self.modules[module.path]
        weight = target.weight
        target.weight = fake_quantize(weight, bits, self.group_size, self.dtype)
        start = self.start(module)
        out = {}
        for mode in MODES:
            total = 0.0
            for scoring, ref, states in zip(
                self.batches[mode], self.reference[mode], self.states[mode]
            ):
                if module.path.endswith("embed_tokens"):
                    logits, _ = forward_with_states(self.model, scoring.inputs, scoring.mask)
                elif start == len(self.model.layers):
                    logits = head(self.model, states[-1])
                else:
                    logits = forward_from(self.model, states[start], start, scoring.mask)
                lp = scored_log_probs(logits, scoring, self.mask_id)
                total += kl_divergence(ref, lp).sum().item()
                self.count.forward(start, scoring.inputs.shape[0])
            out[mode] = total / self.positions[mode]
        target.weight = weight
        return out

    def exact_cost(self, module: Quantizable, measured_bits: int) -> float:
        """Forward units per sample of measuring ``module`` at ``measured_bits`` bits."""
        layers = len(self.model.layers)
        return len(MODES) * measured_bits * (layers - self.start(module) + 1) / (layers + 1)

    def estimated_kl(self, fisher: dict, module: Quantizable, bits: int) -> dict[str, float]:
        weight = self.modules[module.path].weight
        error = (fake_quantize(weight, bits, self.group_size, self.dtype) - weight).square()
        return {mode: 0.5 * (fisher[mode][module.path] * error).sum().item() for mode in MODES}


def _row(scoring: Scoring, row: int) -> Scoring:
    """The scoring of one row of a batch."""
    length = scoring.inputs.shape[1]
    flat = np.array(scoring.positions)
    keep = np.nonzero(flat // length == row)[0]
    return Scoring(
        scoring.inputs[row : row + 1],
        scoring.mask,
        mx.array(flat[keep] - row * length),
        scoring.targets[mx.array(keep)],
    )


def naive_forwards(modules: int, candidates: int) -> float:
    """Forwards per sample of measuring each module at each non-top candidate by full forwards."""
    return len(MODES) * (modules * max(candidates - 1, 1) + 1)


def _kind_factors(modules: dict[str, Quantizable], ratios: dict[str, float]) -> dict[str, float]:
    """Per module kind, exact / estimated KL: geometric mean, shrunk toward the global one."""
    if not ratios:
        return {}
    logs = {p: math.log(r) for p, r in ratios.items()}
    overall = float(np.mean(list(logs.values())))
    by_kind: dict[str, list[float]] = {}
    for p, value in logs.items():
        by_kind.setdefault(modules[p].kind, []).append(value)
    factors = {kind: math.exp((sum(v) + overall) / (len(v) + 1)) for kind, v in by_kind.items()}
    factors[""] = math.exp(overall)
    return factors


def measure_sensitivities(
    model: nn.Module,
    tokens: mx.array,
    modules: list[Quantizable],
    candidate_bits: tuple[int, ...],
    group_size: int,
    *,
    dtype: mx.Dtype,
    budget: Optional[int] = None,
    scale_bits: int = 16,
    method: Method = "auto",
    forward_fraction: float = 0.1,
    block_len: int = 32,
    batch_size: int = 4,
    seed: int = 0,
) -> Sensitivities:
    """KL sensitivities of ``modules`` on ``tokens`` [N, L] (a float32 ``model``).

    ``budget`` (stored bits of the quantized modules) lets ``"auto"`` measure
    exactly the modules where the allocation under that budget is decided.
    """
    if method not in ("auto", "exact"):
        raise ValueError(f"unknown sensitivity method {method!r}: use auto or exact")
    calib = Calibrator(
        model, tokens, dtype=dtype, group_size=group_size, block_len=block_len,
        batch_size=batch_size, seed=seed,
    )
    samples = tokens.shape[0]
    naive = naive_forwards(len(modules), len(candidate_bits))
    below_top = candidate_bits[:-1] or candidate_bits
    exact_all = len(MODES) + sum(calib.exact_cost(m, len(candidate_bits)) for m in modules)
    estimate_cost = 3 * len(MODES)
    allowance = max(forward_fraction * naive, 2 * estimate_cost)
    if method == "auto" and (budget is None or exact_all <= allowance):
        method = "exact"
    by_path = {m.path: m for m in modules}

    if method == "exact":
        calib.capture()
        sens = {}
        for m in tqdm(modules, desc="Measuring each module", leave=False):
            by_bits = {b: calib.exact_kl(m, b) for b in candidate_bits}
            sens[m.path] = Sensitivity({mode: {b: by_bits[b][mode] for b in by_bits} for mode in MODES}, True)
        extra = {}
    else:
        fisher = calib.capture_with_fisher(modules, seed)
        estimates = {
            m.path: {b: calib.estimated_kl(fisher, m, b) for b in candidate_bits} for m in modules
        }
        del fisher
        sens, extra = _refine(
            calib, by_path, estimates, candidate_bits, below_top, group_size, scale_bits,
            budget, allowance - calib.count.units / samples,
        )
    return Sensitivities(
        sens,
        candidate_bits,
        group_size,
        method,
        samples,
        tokens.shape[1],
        calib.count.units / samples,
        naive,
        extra,
    )


def _refine(
    calib: Calibrator,
    modules: dict[str, Quantizable],
    estimates: dict[str, dict[int, dict[str, float]]],
    candidate_bits: tuple[int, ...],
    below_top: tuple[int, ...],
    group_size: int,
    scale_bits: int,
    budget: int,
    allowance: float,
) -> tuple[dict[str, Sensitivity], dict]:
    """Measure exactly, nearest the allocation's cutoff first, while the allowance lasts."""
    floor = 1e-30
    est = {
        p: {b: max(float(np.mean(list(v[b].values()))), floor) for b in candidate_bits}
        for p, v in estimates.items()
    }
    exact: dict[str, dict[int, dict[str, float]]] = {}
    spent = 0.0
    bar = tqdm(total=round(allowance, 1), desc="Measuring near the cut", unit="fwd", leave=False)
    while True:
        values = _combine(modules, est, exact, estimates, candidate_bits)
        points = module_points(list(modules.values()), {p: s.kl for p, s in values.items()},
                               candidate_bits, group_size, scale_bits)
        plan: Allocation = allocate(points, budget)
        margins = {
            p: plan.margin(hull_steps(p, points[p])) for p in modules if p not in exact
        }
        chosen = None
        for p in sorted(margins, key=margins.get):
            cost = calib.exact_cost(modules[p], len(below_top))
            if spent + cost <= allowance:
                chosen = p
                break
        if chosen is None:
            break
        exact[chosen] = {b: calib.exact_kl(modules[chosen], b) for b in below_top}
        spent += cost
        bar.update(cost)
    bar.close()
    ratios = {p: max(np.mean(list(v[below_top[0]].values())), 1e-30) / est[p][below_top[0]]
              for p, v in exact.items()}
    extra = {
        "estimate": "diagonal Fisher (labels sampled from the float model), corrected per module kind",
        "estimate_error_log_std": float(np.std(np.log(list(ratios.values())))) if ratios else None,
    }
    return _combine(modules, est, exact, estimates, candidate_bits), extra


def _combine(
    modules: dict[str, Quantizable],
    est: dict[str, dict[int, float]],
    exact: dict[str, dict[int, dict[str, float]]],
    estimates: dict[str, dict[int, dict[str, float]]],
    candidate_bits: tuple[int, ...],
) -> dict[str, Sensitivity]:
    """Exact values where measured (the top bits scaled by the estimated ratio), else corrected estimates."""
    low = candidate_bits[0]
    ratios = {
        p: max(float(np.mean(list(v[low].values()))), 1e-30) / est[p][low] for p, v in exact.items()
    }
    factors = _kind_factors(modules, ratios)
    out = {}
    for p, m in modules.items():
        if p in exact:
            measured = exact[p]
            top_ratio = {
                mode: estimates[p][candidate_bits[-1]][mode]
                / max(estimates[p][max(measured)][mode], 1e-30)
                for mode in MODES
            }
            by_mode = {
                mode: {
                    b: measured[b][mode] if b in measured else measured[max(measured)][mode] * top_ratio[mode]
                    for b in candidate_bits
                }
                for mode in MODES
            }
            out[p] = Sensitivity(by_mode, True)
        else:
            factor = factors.get(m.kind, factors.get("", 1.0))
            by_mode = {
                mode: {b: estimates[p][b][mode] * factor for b in candidate_bits} for mode in MODES
            }
            out[p] = Sensitivity(by_mode, False)
    return out
