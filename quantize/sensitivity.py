"""Sensitivity of each quantizable module: the KL it costs when it alone is quantized.

KL(float || float with one module quantized) per scored position, on the
calibration tokens, in an AR and a block-diffusion forward (``optiq_dhara.metrics``),
averaged over the sensitivity modes (``choose_modes``): by default the modes
the weights were trained for (``ModelArgs.trained_modes``): AR and diffusion for
a jointly trained (tri-mode) model; AR alone for one trained for next-token only
(a graft: its untrained diffusion would otherwise steer the bits) or without a
MASK token.

Measuring every module exactly by full forwards costs about 2 x modules + 2
forwards per sample. Two things make it cheaper:

- reuse: the float residual stream entering every layer is kept, so quantizing
  a module of layer i only reruns layers i.. (``staged``);
- estimate, then measure where it decides (method ``"auto"``): one backward per
  sample and mode (per n-th sample where the whole allowance is only a few
  forwards, as on tiny models), with labels sampled from the float model, gives the diagonal
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

from .allocate import allocate, hull_steps, module_points
from .modules import Grouping, Quantizable
from .rounding import fake_quantize
from .staged import ForwardCount, forward_from, forward_with_states, head

Method = Literal["auto", "exact"]
METHODS = ("auto", "exact")
SENSITIVITY_MODES = ("auto", "ar", "ar,diffusion")  # what --sensitivity-modes takes
FORMAT = "optiq-dhara sensitivities v1"
TINY = 1e-30  # KL floor: keeps ratios finite


def choose_modes(args, choice: str = "auto") -> tuple[str, ...]:
    """The modes whose KL a sensitivity averages, for a model's ``args``.

    "auto": the modes the weights were trained for (``args.trained_modes``), so a
    model never trained for diffusion is not quantized for it; "ar" or
    "ar,diffusion" override that (diffusion needs the MASK token).
    """
    if choice not in SENSITIVITY_MODES:
        raise ValueError(
            f"sensitivity modes {choice!r} is not one of {', '.join(SENSITIVITY_MODES)}"
        )
    if choice == "auto":
        return tuple(mode for mode in MODES if mode in args.trained_modes)
    modes = tuple(choice.split(","))
    if "diffusion" in modes:
        args.require_mask(f"sensitivity modes {choice!r}")
    return modes


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
    modes: tuple[str, ...]
    candidate_bits: tuple[int, ...]
    grouping: Grouping
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
            "kl": "mean KL(float || one module quantized) per scored position, "
            "averaged over the modes",
            "modes": list(self.modes),
            "candidate_bits": list(self.candidate_bits),
            **self.grouping.as_dict(),
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
    path: Path,
    modules: list[Quantizable],
    candidate_bits: tuple[int, ...],
    grouping: Grouping,
    modes: Optional[tuple[str, ...]] = None,
) -> Sensitivities:
    """Read a sensitivities JSON and check it fits this model and these choices.

    The KL averages ``modes`` (``choose_modes``; default: every mode the file
    measured), each of which the file must have measured: a file measured in AR
    and diffusion serves AR alone too.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"sensitivities file {path} cannot be read: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"sensitivities file {path} is not a {FORMAT!r} file")
    try:
        return _from_dict(data, path, modules, candidate_bits, grouping, modes)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"sensitivities file {path} is malformed (bad or missing {e})") from e


def _from_dict(
    data: dict,
    path: Path,
    modules: list[Quantizable],
    candidate_bits: tuple[int, ...],
    grouping: Grouping,
    modes: Optional[tuple[str, ...]],
) -> Sensitivities:
    if data["group_size"] != grouping.size:
        raise ValueError(
            f"sensitivities file {path} was measured at group size {data['group_size']}, "
            f"not {grouping.size}: pass --group-size {data['group_size']} or measure again"
        )
    measured_rounding = data.get("rounding", "mlx")  # files before roundings: mx.quantize
    if measured_rounding != grouping.rounding:
        raise ValueError(
            f"sensitivities file {path} was measured with rounding {measured_rounding}, not "
            f"{grouping.rounding}: pass --rounding {measured_rounding} or measure again"
        )
    if data["wide_group_bits"] != grouping.wide_bits:
        raise ValueError(
            f"sensitivities file {path} was measured with wide groups from "
            f"{data['wide_group_bits']} bits, not {grouping.wide_bits}: convert with the "
            "same --wide-groups choice or measure again"
        )
    missing_bits = sorted(set(candidate_bits) - set(data["candidate_bits"]))
    if missing_bits:
        raise ValueError(
            f"sensitivities file {path} has no KL for bits {missing_bits}; it has "
            f"{data['candidate_bits']}: measure again with these candidate bits"
        )
    stored = data["modules"]
    measured = tuple(m for m in MODES if m == "ar" or all(m in v for v in stored.values()))
    modes = modes or measured
    if set(modes) - set(measured):
        raise ValueError(
            f"sensitivities file {path} was measured in modes {','.join(measured)}, not "
            f"{','.join(modes)}: pass --sensitivity-modes {','.join(measured)} or measure again"
        )
    wanted = {m.path for m in modules}
    if set(stored) != wanted:
        odd = sorted(wanted ^ set(stored))
        raise ValueError(
            f"sensitivities file {path} does not match this model's modules "
            f"({len(odd)} differ, e.g. {odd[0]}): it was measured on another model"
        )
    sens = {
        p: Sensitivity(
            {mode: {b: float(v[mode][str(b)]) for b in candidate_bits} for mode in modes},
            bool(v["measured"]),
        )
        for p, v in stored.items()
    }
    return Sensitivities(
        sens,
        modes,
        candidate_bits,
        grouping,
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
    scored positions and the residual stream at every layer boundary, in ``modes``
    (default: those the weights were trained for, ``choose_modes``).
    """

    def __init__(
        self,
        model: nn.Module,
        tokens: mx.array,
        *,
        dtype: mx.Dtype,
        grouping: Grouping,
        block_len: int = 32,
        batch_size: int = 4,
        seed: int = 0,
        modes: Optional[tuple[str, ...]] = None,
    ):
        self.model = model
        self.dtype = dtype
        self.grouping = grouping
        self.mask_id = model.args.mask_token_id
        self.modes = modes or choose_modes(model.args)
        self.samples = tokens.shape[0]
        self.count = ForwardCount(len(model.layers))
        self.modules = dict(model.named_modules())
        self.batches = {
            mode: [
                make_scoring(tokens[s : s + batch_size], mode, self.mask_id, block_len, seed + s)
                for s in range(0, self.samples, batch_size)
            ]
            for mode in self.modes
        }
        self.positions = {mode: sum(b.size for b in self.batches[mode]) for mode in self.modes}
        self.reference: dict[str, list[mx.array]] = {mode: [] for mode in self.modes}
        self.states: dict[str, list[list[mx.array]]] = {mode: [] for mode in self.modes}

    def _keep(self, mode: str, log_probs: mx.array, states: list[mx.array]) -> None:
        mx.eval(log_probs, states)
        self.reference[mode].append(log_probs)
        self.states[mode].append(states)

    def capture(self) -> None:
        """One float forward per batch and mode."""
        for mode in self.modes:
            for scoring in tqdm(self.batches[mode], desc=f"Float forwards ({mode})", leave=False):
                logits, states = forward_with_states(self.model, scoring.inputs, scoring.mask)
                self._keep(mode, scored_log_probs(logits, scoring, self.mask_id), states)
                self.count.forward(0, scoring.inputs.shape[0])

    def capture_with_fisher(
        self, modules: list[Quantizable], every: int = 1, seed: int = 0
    ) -> dict:
        """The float forwards, plus the diagonal Fisher of each module's weight per mode.

        One backward, for every ``every``-th sample, of the log-likelihood of
        labels drawn from the float model at the scored positions; the squared
        gradient estimates the Fisher information (its expectation over the
        labels), divided here by the scored positions of those samples.
        """
        key = mx.random.key(seed)
        fisher = {}
        bar = tqdm(
            total=self.samples * len(self.modes), desc="Float forwards + Fisher", leave=False
        )
        for mode in self.modes:
            total = {m.path: mx.zeros(m.shape, mx.float32) for m in modules}
            positions, sample = 0, 0
            for scoring in self.batches[mode]:
                parts, states_parts = [], []
                for row in range(scoring.inputs.shape[0]):
                    one = _row(scoring, row)
                    if sample % every:
                        logits, states = forward_with_states(self.model, one.inputs, one.mask)
                        lp = scored_log_probs(logits, one, self.mask_id)
                    else:
                        key, sub = mx.random.split(key)
                        (_, (lp, states)), grads = nn.value_and_grad(self.model, self._loglik)(
                            one, sub
                        )
                        grads = dict(tree_flatten(grads))
                        for m in modules:
                            total[m.path] = total[m.path] + grads[f"{m.path}.weight"].square()
                        positions += one.size
                        self.count.backward()
                    mx.eval(lp, states, total)
                    parts.append(lp)
                    states_parts.append(states)
                    self.count.forward(0)
                    sample += 1
                    bar.update()
                self._keep(
                    mode,
                    mx.concatenate(parts),
                    [mx.concatenate(s) for s in zip(*states_parts)],
                )
            fisher[mode] = {p: f / max(positions, 1) for p, f in total.items()}
        bar.close()
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
        target.weight = fake_quantize(
            weight, bits, self.grouping.of(module, bits), self.dtype, self.grouping.rounding
        )
        try:
            return {mode: self._kl_from(module, mode) for mode in self.modes}
        finally:
            target.weight = weight

    def _kl_from(self, module: Quantizable, mode: str) -> float:
        """Mean KL in ``mode``, running only what the module's quantization changes."""
        start = self.start(module)
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
        return total / self.positions[mode]

    def exact_cost(self, module: Quantizable, candidates: int) -> float:
        """Forward units per sample of measuring ``module`` at ``candidates`` bit widths."""
        layers = len(self.model.layers)
        return len(self.modes) * candidates * (layers - self.start(module) + 1) / (layers + 1)

    def estimated_kl(self, fisher: dict, module: Quantizable, bits: int) -> dict[str, float]:
        weight = self.modules[module.path].weight
        stored = fake_quantize(
            weight, bits, self.grouping.of(module, bits), self.dtype, self.grouping.rounding
        )
        error = (stored - weight).square()
        return {mode: 0.5 * (fisher[mode][module.path] * error).sum().item() for mode in self.modes}


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


def fisher_stride(allowance: float, samples: int, modes: int = len(MODES)) -> int:
    """Take the Fisher backward (2 forward units) on every n-th sample, n the smallest
    that keeps the float forwards and backwards (in ``modes`` modes) within half of
    ``allowance``."""
    per_mode = allowance / 2 / modes
    if per_mode <= 1:
        return samples
    return min(samples, max(1, math.ceil(2 / (per_mode - 1))))


def naive_forwards(modules: int, candidates: int, modes: int = len(MODES)) -> float:
    """Forwards per sample of measuring each module at each non-top candidate by full
    forwards, in ``modes`` modes."""
    return modes * (modules * max(candidates - 1, 1) + 1)


def _mean(by_mode: dict[str, float]) -> float:
    return max(float(np.mean(list(by_mode.values()))), TINY)


class Refinement:
    """Estimated KL everywhere, exact KL where measured; combined into sensitivities.

    The estimate of an unmeasured module is scaled by how far the estimates of
    measured modules of its kind were off (geometric mean of exact / estimated,
    shrunk toward that of all measured modules by one pseudo-observation).
    """

    def __init__(self, modules: dict[str, Quantizable], estimates, candidate_bits: tuple[int, ...]):
        self.modules = modules
        self.estimates = estimates  # path -> bits -> mode -> KL
        self.bits = candidate_bits
        self.measured_bits = candidate_bits[:-1] or candidate_bits
        self.exact: dict[str, dict[int, dict[str, float]]] = {}

    def _log_errors(self) -> dict[str, float]:
        low = self.measured_bits[0]
        return {
            p: math.log(_mean(v[low]) / _mean(self.estimates[p][low]))
            for p, v in self.exact.items()
        }

    def _factors(self) -> dict[str, float]:
        errors = self._log_errors()
        if not errors:
            return {}
        overall = float(np.mean(list(errors.values())))
        by_kind: dict[str, list[float]] = {}
        for p, value in errors.items():
            by_kind.setdefault(self.modules[p].kind, []).append(value)
        factors = {k: math.exp((sum(v) + overall) / (len(v) + 1)) for k, v in by_kind.items()}
        return {"": math.exp(overall), **factors}

    def _measured(self, path: str) -> dict[str, dict[int, float]]:
        """Exact KL; a top candidate left unmeasured gets the estimated ratio to the one below."""
        exact, est = self.exact[path], self.estimates[path]
        below = max(exact)
        return {
            mode: {
                b: exact[b][mode]
                if b in exact
                else exact[below][mode] * est[b][mode] / max(est[below][mode], TINY)
                for b in self.bits
            }
            for mode in exact[below]
        }

    def sensitivities(self) -> dict[str, Sensitivity]:
        factors = self._factors()
        out = {}
        for p, m in self.modules.items():
            if p in self.exact:
                out[p] = Sensitivity(self._measured(p), True)
            else:
                f = factors.get(m.kind, factors.get("", 1.0))
                est = self.estimates[p]
                out[p] = Sensitivity(
                    {mode: {b: est[b][mode] * f for b in self.bits} for mode in est[self.bits[0]]},
                    False,
                )
        return out

    def summary(self) -> dict:
        errors = list(self._log_errors().values())
        return {
            "estimate": "diagonal Fisher (labels sampled from the float model), "
            "corrected per module kind",
            "estimate_log_error_std": float(np.std(errors)) if errors else None,
        }


def refine(
    calib: Calibrator,
    refinement: Refinement,
    grouping: Grouping,
    scale_bits: int,
    budget: int,
    allowance: float,
) -> None:
    """Measure exactly, nearest the allocation's cutoff first, while ``allowance`` lasts."""
    modules = list(refinement.modules.values())
    width = len(refinement.measured_bits)
    spent = 0.0
    bar = tqdm(
        total=max(allowance, 0.0),  # the estimate may already have spent it all
        desc="Measuring near the cut",
        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} forwards per sample [{elapsed}<{remaining}]",
        leave=False,
    )
    while True:
        kl = {p: s.kl for p, s in refinement.sensitivities().items()}
        points = module_points(modules, kl, refinement.bits, grouping, scale_bits)
        plan = allocate(points, budget)
        margins = {
            m.path: plan.margin(hull_steps(m.path, points[m.path]))
            for m in modules
            if m.path not in refinement.exact
        }
        affordable = [
            p
            for p in sorted(margins, key=margins.get)
            if spent + calib.exact_cost(refinement.modules[p], width) <= allowance
        ]
        if not affordable:
            break
        chosen = refinement.modules[affordable[0]]
        refinement.exact[chosen.path] = {
            b: calib.exact_kl(chosen, b) for b in refinement.measured_bits
        }
        spent += calib.exact_cost(chosen, width)
        bar.update(calib.exact_cost(chosen, width))
    bar.close()


def measure_sensitivities(
    model: nn.Module,
    tokens: mx.array,
    modules: list[Quantizable],
    candidate_bits: tuple[int, ...],
    grouping: Grouping,
    *,
    dtype: mx.Dtype,
    budget: Optional[int] = None,
    scale_bits: int = 16,
    method: Method = "auto",
    forward_fraction: float = 0.1,
    block_len: int = 32,
    batch_size: int = 4,
    seed: int = 0,
    modes: Optional[tuple[str, ...]] = None,
) -> Sensitivities:
    """KL sensitivities of ``modules`` on ``tokens`` [N, L] (``model`` in float32).

    The KL averages ``modes`` (default: ``choose_modes(model.args)``, those the
    weights were trained for).

    ``budget`` (stored bits of the quantized modules) lets ``"auto"`` measure
    exactly the modules where the allocation under that budget is decided; it
    spends at most ``forward_fraction`` of the naive cost (the estimate from a
    subset of the samples when the whole would take over half of that), and
    measures everything when that is no dearer.
    """
    if method not in METHODS:
        raise ValueError(f"sensitivity method {method!r} is not one of {', '.join(METHODS)}")
    calib = Calibrator(
        model,
        tokens,
        dtype=dtype,
        grouping=grouping,
        block_len=block_len,
        batch_size=batch_size,
        seed=seed,
        modes=modes,
    )
    samples, modes = tokens.shape[0], len(calib.modes)
    naive = naive_forwards(len(modules), len(candidate_bits), modes)
    exact_all = modes + sum(calib.exact_cost(m, len(candidate_bits)) for m in modules)
    allowance = forward_fraction * naive
    if method == "auto" and (budget is None or exact_all <= allowance):
        method = "exact"

    if method == "exact":
        calib.capture()
        sens = {}
        for m in tqdm(modules, desc="Measuring each module", leave=False):
            kl = {b: calib.exact_kl(m, b) for b in candidate_bits}
            sens[m.path] = Sensitivity(
                {mode: {b: kl[b][mode] for b in kl} for mode in calib.modes}, True
            )
        extra = {}
    else:
        fisher = calib.capture_with_fisher(modules, fisher_stride(allowance, samples, modes), seed)
        estimates = {
            m.path: {b: calib.estimated_kl(fisher, m, b) for b in candidate_bits} for m in modules
        }
        del fisher
        refinement = Refinement({m.path: m for m in modules}, estimates, candidate_bits)
        spent = calib.count.units / samples
        refine(calib, refinement, grouping, scale_bits, budget, allowance - spent)
        sens, extra = refinement.sensitivities(), refinement.summary()
    return Sensitivities(
        sens,
        calib.modes,
        candidate_bits,
        grouping,
        method,
        samples,
        tokens.shape[1],
        calib.count.units / samples,
        naive,
        extra,
    )
