"""``convert``: a Hugging Face dhara checkpoint to an MLX directory, optionally mixed-precision.

Without a target it only converts (MLX layout, chosen dtype). With
``target_bpw`` it measures each quantizable module's KL sensitivity on
calibration text, gives each module the candidate bits that save the most KL per
stored bit within the budget, writes the model with one quantization entry per
module in config.json, checks the written files carry that plan, and scores the
mix and uniform 4- and 8-bit models on held-out text (``quantization_report.json``).
A checkpoint without a MASK token (AR-only) converts the same way, measured and
scored in AR mode alone; the report's ``modes`` says which modes the model has.
The sensitivities average the modes the weights were trained for
(``choose_modes``: AR alone for a graft not yet trained jointly, whose
config.json says ``"dhara_objective": "ar"``) unless ``sensitivity_modes`` says
otherwise; the report's ``sensitivity.modes`` records them.
With ``refine="dwq"`` the quantized scales and biases of the modules below 8 bits
are then trained to match the float model on calibration text (mlx-lm's DWQ,
``optiq_dhara.quantize.refine``); the bits stay as allocated, and the report
scores the mix before refinement too (``held_out.mix_unrefined``).
"""

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import load_model, save_config, save_model

from optiq_dhara.quantize.allocate import allocate, module_points
from optiq_dhara.quantize.apply import (
    as_float32,
    module_bits,
    quantization_config,
    quantize_to_plan,
    stored_bytes,
    stored_plan,
)
from optiq_dhara.quantize.budget import Budget
from optiq_dhara.quantize.calibration import load_calibration
from optiq_dhara.quantize.modules import (
    Grouping,
    Quantizable,
    check_candidates,
    check_group_size,
    quantizable_modules,
)
from optiq_dhara.quantize.refine import (
    DWQ_EPOCHS,
    DWQ_LEARNING_RATE,
    REFINEMENTS,
    dwq_refine,
)
from optiq_dhara.quantize.rounding import DEFAULT_ROUNDING, check_rounding
from optiq_dhara.quantize.sensitivity import (
    METHODS,
    Sensitivities,
    choose_modes,
    load_sensitivities,
    measure_sensitivities,
)

from .report import evaluate_variants
from .source import DTYPES, Source, cast, load_source, resolve_dtype
from .writer import atomic_directory, check_destination

PathLike = Union[str, Path]
DEFAULT_BITS = (4, 8)
DEFAULT_GROUP_SIZE = 64
DEFAULT_SAMPLES = 16
DEFAULT_SEQ_LEN = 256
REPORT = "quantization_report.json"
SENSITIVITIES = "sensitivities.json"
EXTRA_FILES = ("generation_config.json",)


def convert(
    hf_path: str,
    mlx_path: PathLike,
    target_bpw: Optional[float] = None,
    candidate_bits: Optional[Sequence[int]] = None,
    group_size: Optional[int] = None,
    calibration: Optional[PathLike] = None,
    num_samples: Optional[int] = None,
    seq_len: Optional[int] = None,
    dtype: Optional[str] = None,
    sensitivities: Optional[PathLike] = None,
    force: bool = False,
    *,
    sensitivity_method: str = "auto",
    sensitivity_modes: str = "auto",
    held_out_samples: int = 8,
    block_len: int = 32,
    seed: int = 0,
    revision: Optional[str] = None,
    wide_groups: bool = True,
    rounding: str = DEFAULT_ROUNDING,
    refine: str = "none",
    refine_samples: Optional[int] = None,
    refine_epochs: int = DWQ_EPOCHS,
    refine_learning_rate: float = DWQ_LEARNING_RATE,
) -> dict:
    """Convert ``hf_path`` (directory or Hub id) into ``mlx_path``; returns the report.

    Raises ValueError, naming the offending input, for a bad source, destination,
    budget, candidate bits, group size or calibration file. ``mlx_path`` is
    written atomically and an existing one is replaced only with ``force``.
    ``wide_groups`` stores 8-bit modules in the widest group size their rows
    allow (``Grouping``); without it every module takes ``group_size``.
    ``rounding``: "best" (per group, the better of MLX's grid and the min-max grid)
    or "mlx" (``mx.quantize``); see ``quantize.rounding``.
    ``sensitivity_modes``: "auto" (the modes the weights were trained for), "ar"
    or "ar,diffusion": the modes whose KL the sensitivities average.
    ``refine``: "none" or "dwq" (train the quantized scales and biases on
    ``refine_samples`` calibration sequences, default ``num_samples``, for
    ``refine_epochs`` passes at ``refine_learning_rate``).
    """
    started = time.perf_counter()
    dst = Path(mlx_path)
    check_destination(dst, force)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if sensitivity_method not in METHODS:
        raise ValueError(
            f"sensitivity method {sensitivity_method!r} is not one of {', '.join(METHODS)}"
        )
    check_rounding(rounding)
    if refine not in REFINEMENTS:
        raise ValueError(f"refinement {refine!r} is not one of {', '.join(REFINEMENTS)}")
    if refine == "none" and refine_samples is not None:
        raise ValueError("refine_samples only applies with a refinement: add refine dwq")
    if target_bpw is None:
        quant_only = {
            "candidate_bits": candidate_bits,
            "group_size": group_size,
            "calibration": calibration,
            "num_samples": num_samples,
            "seq_len": seq_len,
            "sensitivities": sensitivities,
            "sensitivity_modes": None if sensitivity_modes == "auto" else sensitivity_modes,
            "rounding": None if rounding == DEFAULT_ROUNDING else rounding,
            "refine": None if refine == "none" else refine,
            "refine_samples": refine_samples,
        }
        given = [name for name, value in quant_only.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply when quantizing: add a target bpw")
    group_size = group_size or DEFAULT_GROUP_SIZE
    bits = check_candidates(candidate_bits or DEFAULT_BITS, group_size)

    source = load_source(hf_path, revision)
    if dst.resolve() == source.path.resolve():
        raise ValueError(f"destination {dst} is the source checkpoint; write somewhere else")
    out_dtype = resolve_dtype(dtype, source.config, source.model)
    model = cast(source.model, out_dtype)
    config = {**source.config, "torch_dtype": _dtype_name(out_dtype)}
    if target_bpw is None:
        with atomic_directory(dst, force) as tmp:
            _write(tmp, model, config, source)
        return {
            "quantized": False,
            "dtype": config["torch_dtype"],
            "size_mb": stored_bytes(dst) / 1e6,
            "modes": list(model.args.modes),
        }

    modes = choose_modes(model.args, sensitivity_modes)
    modules = quantizable_modules(model)
    check_group_size(modules, group_size)
    grouping = Grouping.choose(group_size, wide_groups, rounding)
    budget = Budget.of(model, modules, bits, grouping)
    budget.check(target_bpw)
    data = load_calibration(
        source.tokenizer,
        Path(calibration) if calibration is not None else None,
        num_samples or DEFAULT_SAMPLES,
        seq_len or DEFAULT_SEQ_LEN,
        held_out_samples,
    )
    reference = as_float32(copy.deepcopy(model))
    seconds = {}
    tick = time.perf_counter()
    if sensitivities is not None:
        sens = load_sensitivities(Path(sensitivities), modules, bits, grouping, modes)
    else:
        sens = measure_sensitivities(
            reference,
            data.calibration,
            modules,
            bits,
            grouping,
            dtype=out_dtype,
            budget=budget.for_modules(target_bpw),
            scale_bits=budget.scale_bits,
            method=sensitivity_method,
            block_len=block_len,
            seed=seed,
            modes=modes,
        )
    seconds["sensitivities"] = time.perf_counter() - tick

    points = module_points(modules, sens.kl(), bits, grouping, budget.scale_bits)
    plan = allocate(points, budget.for_modules(target_bpw)).bits
    group_sizes = grouping.sizes(modules, plan)
    quantize_to_plan(model, plan, group_sizes, grouping.rounding)
    config["quantization"] = quantization_config(plan, group_sizes)
    refined = None
    if refine == "dwq":
        tick = time.perf_counter()
        refine_data = data
        if refine_samples is not None:
            refine_data = load_calibration(
                source.tokenizer,
                Path(calibration) if calibration is not None else None,
                refine_samples,
                seq_len or DEFAULT_SEQ_LEN,
                held_out_samples,
            )
        refined = dwq_refine(
            model,
            reference,
            refine_data.calibration,
            data.held_out,
            epochs=refine_epochs,
            learning_rate=refine_learning_rate,
            seed=seed,
        )
        seconds["refine"] = time.perf_counter() - tick

    with atomic_directory(dst, force) as tmp:
        tick = time.perf_counter()
        _write(tmp, model, config, source)
        achieved = _verify(tmp, modules, plan, group_sizes, budget, target_bpw)
        seconds["write"] = time.perf_counter() - tick
        tick = time.perf_counter()
        variants: dict[str, Callable[[], nn.Module]] = {
            "mix": lambda: as_float32(load_model(tmp)[0]),
            "uniform_4": lambda: _uniform(reference, modules, 4, grouping, out_dtype),
            "uniform_8": lambda: _uniform(reference, modules, 8, grouping, out_dtype),
        }
        if refined is not None:
            variants["mix_unrefined"] = lambda: _quantized(
                reference, plan, group_sizes, out_dtype, grouping.rounding
            )
        held_out = evaluate_variants(
            reference, variants, data.held_out, block_len=block_len, seed=seed
        )
        seconds["held_out_evaluation"] = time.perf_counter() - tick
        sens.save(tmp / SENSITIVITIES)
        seconds["total"] = time.perf_counter() - started
        report = {
            "source": hf_path,
            "modes": list(model.args.modes),  # decoding modes; sensitivity.modes: those weighed
            "quantized": True,
            "target_bpw": target_bpw,
            "achieved_bpw": achieved,
            "size_mb": stored_bytes(tmp) / 1e6,
            "parameters": budget.parameters,
            **grouping.as_dict(),
            "candidate_bits": list(bits),
            "modules_per_bits": {
                str(b): sum(v == b for v in plan.values()) for b in sorted(set(plan.values()))
            },
            "layers": _layers(modules, plan, group_sizes, sens),
            "sensitivity": {
                k: v for k, v in sens.as_dict().items() if k not in ("modules", "format")
            },
            "refine": refined or {"method": "none"},
            "calibration": {
                "source": data.source,
                "samples": data.calibration.shape[0],
                "held_out_samples": data.held_out.shape[0],
                "seq_len": data.calibration.shape[1],
            },
            "held_out": held_out,
            "seconds": seconds,
        }
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
    return report


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).split(".")[-1]


def _write(tmp: Path, model: nn.Module, config: dict, source: Source) -> None:
    save_model(tmp, model)
    save_config(dict(config), tmp / "config.json")
    source.tokenizer.save_pretrained(str(tmp))
    for name in EXTRA_FILES:
        if (source.path / name).is_file():
            shutil.copy(source.path / name, tmp / name)


def _verify(
    tmp: Path,
    modules: list[Quantizable],
    plan: dict[str, int],
    group_sizes: dict[str, int],
    budget: Budget,
    target_bpw: float,
) -> float:
    """The written files carry exactly the plan and fit the budget; returns the achieved bpw."""
    written = stored_plan(tmp, {m.path: m.shape[1] for m in modules})
    expected = {path: (bits, group_sizes[path]) for path, bits in plan.items()}
    if written != expected:
        odd = sorted(p for p in set(written) | set(expected) if written.get(p) != expected.get(p))
        raise RuntimeError(
            f"the written weights do not carry the planned bits: {odd[0]} is "
            f"{written.get(odd[0])}, planned {expected.get(odd[0])}"
        )
    try:
        loaded = module_bits(load_model(tmp, lazy=True)[0])
    except ValueError as e:
        raise RuntimeError(f"the written model does not load with mlx_lm: {e}") from e
    if loaded != plan:
        raise RuntimeError("mlx_lm.load does not give each module its planned bits")
    achieved = stored_bytes(tmp) * 8 / budget.parameters
    if achieved > target_bpw:
        raise RuntimeError(
            f"the written model takes {achieved:.4f} bpw, over the target {target_bpw}"
        )
    return achieved


def _quantized(
    reference: nn.Module,
    plan: dict[str, int],
    group_sizes: dict[str, int],
    dtype,
    rounding: str,
):
    """``reference`` in ``dtype`` quantized to ``plan`` (no refinement), as float32."""
    model = cast(copy.deepcopy(reference), dtype)
    return as_float32(quantize_to_plan(model, plan, group_sizes, rounding))


def _uniform(
    reference: nn.Module, modules: list[Quantizable], bits: int, grouping: Grouping, dtype
):
    plan = {m.path: bits for m in modules}
    return _quantized(reference, plan, grouping.sizes(modules, plan), dtype, grouping.rounding)


def _layers(
    modules: list[Quantizable],
    plan: dict[str, int],
    group_sizes: dict[str, int],
    sens: Sensitivities,
) -> dict:
    """Per module: its bits, group size, KL at each candidate, and whether that was measured."""
    kl = sens.kl()
    return {
        m.path: {
            "bits": plan[m.path],
            "group_size": group_sizes[m.path],
            "sensitivity": {str(b): v for b, v in kl[m.path].items()},
            "measured": sens.modules[m.path].measured,
        }
        for m in modules
    }
