"""The KL-sensitivity mix against uniform 4-bit, mlx-lm's ``mixed_4_6`` and ``dynamic_quant``.

Every variant is scored by ``optiq_dhara.metrics.compare`` against the float
model on the same held-out sequences (the converter's held-out split of the
shipped corpus), in float32 arithmetic on the stored values. Bits per weight
are stored tensor bits / float parameters for every variant alike. The mix is
also allocated at each baseline's own achieved bpw, reusing its sensitivities,
so each comparison is at equal size.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/bench_quantize.py --model random-250m --num-samples 4 --seq-len 128
    python benchmarks/bench_quantize.py --model trained --group-size 32 --target-bpw 5.5

``--no-wide-groups`` gives the mix the baselines' group size at every bits.

Real weights: ``--model smollm2`` grafts SmolLM2-135M-Instruct from the ``real``
extra's GGUF (``optiq_dhara.convert.real``), whose config records AR training,
so the mix weighs AR alone (``--sensitivity-modes`` overrides). ``--held-out``
scores every variant on another text than the calibration corpus (the converter's
own report keeps the corpus split); ``--gptq`` adds the mix with mlx-lm's GPTQ
for its 4-bit linears:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/bench_quantize.py --model smollm2 --num-samples 8 --seq-len 128 \\
        --held-out benchmarks/held_out_code.txt --held-out-samples 16 --gptq

``--refine dwq`` adds the mix (at the target and at dynamic_quant's bpw) and
dynamic_quant, each after mlx-lm's DWQ (``optiq_dhara.quantize.refine``) trained on
``--refine-samples`` sequences of the calibration text (never the ``--held-out`` text).
"""

import copy
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import typer
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten
from mlx_lm.convert import mixed_quant_predicate_builder
from mlx_lm.quant.dynamic_quant import estimate_sensitivities, estimate_threshold
from mlx_lm.quant.gptq import gptq_quantize
from mlx_lm.utils import load, quantize_model

from optiq_dhara.convert import convert
from optiq_dhara.convert.graft import graft
from optiq_dhara.convert.real import smollm2_gguf
from optiq_dhara.convert.source import cast
from optiq_dhara.metrics import MODES, compare
from optiq_dhara.model import Model, ModelArgs
from optiq_dhara.quantize import (
    allocate,
    load_calibration,
    load_sensitivities,
    measure_sensitivities,
    module_points,
    quantizable_modules,
    quantize_to_plan,
)
from optiq_dhara.quantize.apply import as_float32, module_bits, module_group_sizes
from optiq_dhara.quantize.budget import Budget
from optiq_dhara.quantize.modules import Grouping, parameter_count
from optiq_dhara.quantize.refine import DWQ_EPOCHS, DWQ_LEARNING_RATE, REFINEMENTS, dwq_refine
from optiq_dhara.quantize.rounding import DEFAULT_ROUNDING

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests/fixtures/golden_tiny"
TRAINED = ROOT / "tests/fixtures/dhara_tiny_trained"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def random_250m(directory: Path, seed: int = 0) -> Path:
    """A dhara-250m-shaped checkpoint (HF layout, bfloat16) with random weights.

    Linears and the embedding ~ N(0, 0.02); Canon taps ~ N(0, 0.1); norms 1.
    The tokenizer is the golden fixture's (its ids are a subset of the vocabulary).
    """
    mx.random.seed(seed)
    args = ModelArgs()
    model = Model(args)

    def init(key: str, value: mx.array) -> mx.array:
        if key.endswith("inv_freq"):
            return value
        if "norm" in key:
            return value.astype(mx.bfloat16)
        if key.endswith("conv.weight"):  # MLX (C, K, 1) -> PyTorch (C, 1, K)
            return (mx.random.normal(value.shape) * 0.1).astype(mx.bfloat16).transpose(0, 2, 1)
        return (mx.random.normal(value.shape) * 0.02).astype(mx.bfloat16)

    weights = dict(tree_flatten(tree_map_with_path(init, model.parameters())))
    directory.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(directory / "model.safetensors"), weights)
    config = {
        "architectures": ["DharaARForCausalLM"],
        "model_type": "dhara_ar",
        "torch_dtype": "bfloat16",
        **{k: v for k, v in args.__dict__.items() if k != "model_type"},
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        (directory / name).write_bytes((GOLDEN / name).read_bytes())
    return directory


def held_out_sequences(tokenizer, path: Path, count: int, seq_len: int) -> mx.array:
    """``count`` sequences of ``seq_len`` tokens spread evenly over the text of ``path``."""
    ids = tokenizer.encode(path.read_text("utf-8"), add_special_tokens=False)
    chunks = len(ids) // seq_len
    if chunks < count:
        raise ValueError(f"{path} gives {chunks} sequences of {seq_len} tokens, not {count}")
    stream = np.array(ids[: chunks * seq_len], dtype=np.int32).reshape(chunks, seq_len)
    return mx.array(stream[np.linspace(0, chunks, count, endpoint=False).astype(int)])


def bits_by_kind(layers: dict) -> dict[str, dict[str, int]]:
    """How many modules of each kind (q_proj, ..., embed_tokens) the mix gives each bits."""
    counts: dict[str, dict[str, int]] = {}
    for path, layer in layers.items():
        kind = counts.setdefault(path.rsplit(".", 1)[-1], {})
        kind[str(layer["bits"])] = kind.get(str(layer["bits"]), 0) + 1
    return counts


def with_gptq(model: nn.Module, gptq: dict[str, nn.Module], plan: dict[str, int]) -> nn.Module:
    """``model`` (quantized to ``plan``) with GPTQ's 4-bit layer wherever the plan has 4."""
    swaps = [(path, gptq[path]) for path, bits in plan.items() if bits == 4 and path in gptq]
    model.update_modules(tree_unflatten(swaps))
    return model


def bpw(model: nn.Module, parameters: int) -> float:
    """Stored tensor bits per float parameter (the converter's definition)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters())) * 8 / parameters


def score(model: nn.Module, reference: nn.Module, held_out: mx.array, parameters: int) -> dict:
    """Bits per weight, then (the model is dequantized in place) KL and top-1 per mode."""
    out = {"bpw": bpw(model, parameters)}
    fp32 = as_float32(model)
    for mode in MODES:
        result = compare(fp32, reference, held_out, mode)
        out[mode] = {"mean_kl": result.mean_kl, "top1": result.top1_agreement}
    return out


def main(
    model: str = typer.Option(
        "random-250m",
        help="random-250m, trained, smollm2 (grafted from the real extra), or a checkpoint "
        "directory.",
    ),
    target_bpw: float = typer.Option(5.0),
    candidate_bits: str = typer.Option("4,8", help="The mix's candidate bits."),
    group_size: int = typer.Option(64),
    dtype: str = typer.Option("bfloat16", help="Float dtype of every variant (and its scales)."),
    num_samples: int = typer.Option(4),
    seq_len: int = typer.Option(128),
    held_out_samples: int = typer.Option(4),
    exact_baseline: bool = typer.Option(True, help="Also measure every module exactly."),
    wide_groups: bool = typer.Option(True, help="The mix stores 8-bit modules in wide groups."),
    rounding: str = typer.Option(
        DEFAULT_ROUNDING,
        help="The mix's rounding (best or mlx); the mlx-lm recipes keep mx.quantize's, "
        "and are also scored with this rounding of their own bits.",
    ),
    calibration: Optional[Path] = typer.Option(
        None, help="Calibration and held-out text (default: the shipped corpus)."
    ),
    held_out: Optional[Path] = typer.Option(
        None, help="Score the variants on this text instead (another domain than calibration)."
    ),
    sensitivity_modes: str = typer.Option(
        "auto", help="The mix's sensitivity modes: auto, ar or ar,diffusion."
    ),
    gptq: bool = typer.Option(False, help="Also the mix with mlx-lm's GPTQ for its 4-bit linears."),
    refine: str = typer.Option(
        "none", help="dwq: also the mix and dynamic_quant after mlx-lm's DWQ (none: not)."
    ),
    refine_samples: int = typer.Option(32, help="Calibration sequences DWQ trains on."),
    refine_epochs: int = typer.Option(DWQ_EPOCHS, help="DWQ passes over them."),
    refine_lr: float = typer.Option(DWQ_LEARNING_RATE, help="DWQ's Adam learning rate."),
    output: Optional[Path] = typer.Option(None, help="Write the results as JSON here."),
) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench_quantize_"))
    try:
        results = run(
            work,
            model,
            target_bpw,
            candidate_bits,
            group_size,
            dtype,
            num_samples,
            seq_len,
            held_out_samples,
            exact_baseline,
            wide_groups,
            calibration,
            held_out,
            rounding,
            sensitivity_modes,
            gptq,
            refine,
            refine_samples,
            refine_epochs,
            refine_lr,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    if output is not None:
        output.write_text(json.dumps(results, indent=2))


def run(
    work: Path,
    model: str,
    target_bpw: float,
    candidate_bits: str,
    group_size: int,
    dtype: str,
    num_samples: int,
    seq_len: int,
    held_out_samples: int,
    exact_baseline: bool,
    wide_groups: bool,
    calibration: Optional[Path] = None,
    held_out: Optional[Path] = None,
    rounding: str = DEFAULT_ROUNDING,
    sensitivity_modes: str = "auto",
    gptq: bool = False,
    refine: str = "none",
    refine_samples: int = 32,
    refine_epochs: int = DWQ_EPOCHS,
    refine_lr: float = DWQ_LEARNING_RATE,
) -> dict:
    """Convert, then score the mix and the baselines; the results as a dict."""
    if refine not in REFINEMENTS:
        raise ValueError(f"refinement {refine!r} is not one of {', '.join(REFINEMENTS)}")
    bits = tuple(int(b) for b in candidate_bits.split(","))
    if model == "random-250m":
        src = random_250m(work / "src")
    elif model == "trained":
        src = TRAINED
    elif model == "smollm2":
        src = work / "src"
        graft(str(smollm2_gguf()), src, dtype="float32")
    else:
        src = Path(model)
    results: dict = {
        "model": model,
        "target_bpw": target_bpw,
        "group_size": group_size,
        "wide_groups": wide_groups,
        "rounding": rounding,
        "calibration": str(calibration or "shipped corpus"),
        "held_out": str(held_out or "the calibration text's held-out split"),
        "held_out_samples": held_out_samples,
        "candidate_bits": bits,
        "dtype": dtype,
        "num_samples": num_samples,
        "seq_len": seq_len,
        "date": time.strftime("%Y-%m-%d"),
    }

    tick = time.perf_counter()
    report = convert(
        str(src),
        work / "mix",
        target_bpw=target_bpw,
        group_size=group_size,
        dtype=dtype,
        candidate_bits=bits,
        num_samples=num_samples,
        seq_len=seq_len,
        held_out_samples=held_out_samples,
        wide_groups=wide_groups,
        rounding=rounding,
        calibration=calibration,
        sensitivity_modes=sensitivity_modes,
    )
    results["convert_seconds"] = time.perf_counter() - tick
    results["convert_phases"] = report["seconds"]
    results["report"] = {
        k: report[k] for k in ("achieved_bpw", "size_mb", "modules_per_bits", "sensitivity")
    }
    results["report_held_out"] = report["held_out"]
    results["bits_by_kind"] = bits_by_kind(report["layers"])

    float_model, tokenizer = load(str(src))
    out_dtype = getattr(mx, dtype)
    float_model = cast(float_model, out_dtype)
    params = parameter_count(float_model)
    data = load_calibration(tokenizer, calibration, num_samples, seq_len, held_out_samples)
    scored = data.held_out
    if held_out is not None:
        scored = held_out_sequences(tokenizer, held_out, held_out_samples, seq_len)
    reference = as_float32(copy.deepcopy(float_model))

    def fresh() -> nn.Module:
        """A float model in the output dtype, to quantize."""
        return cast(copy.deepcopy(reference), out_dtype)

    modules = quantizable_modules(float_model)
    grouping = Grouping.choose(group_size, wide_groups, rounding)
    budget = Budget.of(float_model, modules, bits, grouping)
    sens_file = work / "mix" / "sensitivities.json"
    auto = load_sensitivities(sens_file, modules, bits, grouping)

    def plan_at(target: float, sens) -> dict[str, int]:
        points = module_points(modules, sens.kl(), bits, grouping, budget.scale_bits)
        return allocate(points, budget.for_modules(target)).bits

    def mix_at(target: float, sens, rounding: str = grouping.rounding) -> nn.Module:
        plan = plan_at(target, sens)
        return quantize_to_plan(fresh(), plan, grouping.sizes(modules, plan), rounding)

    def rounded(recipe: nn.Module) -> nn.Module:
        """An mlx-lm recipe's bits and group sizes, each group rounded by ``rounding``."""
        plan, sizes = module_bits(recipe), module_group_sizes(recipe)
        return quantize_to_plan(fresh(), plan, sizes, grouping.rounding)

    variants: dict[str, dict] = {}
    variants["mix"] = score(mix_at(target_bpw, auto), reference, scored, params)
    if rounding != "mlx":
        variants["mix, mx.quantize rounding"] = score(
            mix_at(target_bpw, auto, "mlx"), reference, scored, params
        )
    uniform_4 = {m.path: 4 for m in modules}
    variants["uniform 4-bit"] = score(
        quantize_to_plan(fresh(), uniform_4, grouping.sizes(modules, uniform_4), "mlx"),
        reference,
        scored,
        params,
    )

    recipe = fresh()
    config = json.loads((src / "config.json").read_text())
    predicate = mixed_quant_predicate_builder("mixed_4_6", recipe, group_size)
    recipe, _ = quantize_model(recipe, config, group_size, 4, quant_predicate=predicate)
    if rounding != "mlx":
        variants[f"mlx-lm mixed_4_6, {rounding} rounding"] = score(
            rounded(recipe), reference, scored, params
        )
    variants["mlx-lm mixed_4_6"] = score(recipe, reference, scored, params)

    tick = time.perf_counter()
    dq_sens = dict(
        estimate_sensitivities(
            copy.deepcopy(reference), data.calibration, 4, group_size, 8, group_size
        )
    )
    threshold = estimate_threshold(fresh(), dq_sens, target_bpw, 4, group_size, 8, group_size)

    def high(path: str, module: nn.Module):
        """dynamic_quant's own rule: 8 bits above its threshold."""
        if not hasattr(module, "to_quantized"):
            return False
        return {"bits": 8, "group_size": group_size} if dq_sens[path] > threshold else True

    def dynamic_quant() -> nn.Module:
        return quantize_model(fresh(), config, group_size, 4, quant_predicate=high)[0]

    if rounding != "mlx":
        variants[f"mlx-lm dynamic_quant (4/8), {rounding} rounding"] = score(
            rounded(dynamic_quant()), reference, scored, params
        )
    variants["mlx-lm dynamic_quant (4/8)"] = score(dynamic_quant(), reference, scored, params)
    variants["mlx-lm dynamic_quant (4/8)"]["seconds"] = time.perf_counter() - tick

    for name in ("mlx-lm mixed_4_6", "mlx-lm dynamic_quant (4/8)"):
        their = variants[name]["bpw"]
        if budget.bpw(budget.low) <= their <= budget.bpw(budget.high):
            variants[f"mix at {name}'s bpw"] = score(mix_at(their, auto), reference, scored, params)

    if gptq:
        tick = time.perf_counter()
        # in float32: bfloat16 Hessians gave NaN weights on SmolLM2; the scales are then
        # stored in the output dtype, as the mix's are
        quantized, _ = gptq_quantize(
            copy.deepcopy(reference), data.calibration, 4, group_size, 8, group_size
        )
        gptq_layers = {}
        for path, module in quantized.named_modules():
            if isinstance(module, nn.QuantizedLinear) and module.bits == 4:
                module.set_dtype(out_dtype)
                gptq_layers[path] = module
        results["gptq_seconds"] = time.perf_counter() - tick
        targets = {"mix + GPTQ": target_bpw}
        their = variants["mlx-lm dynamic_quant (4/8)"]["bpw"]
        if budget.bpw(budget.low) <= their <= budget.bpw(budget.high):
            targets["mix + GPTQ at mlx-lm dynamic_quant (4/8)'s bpw"] = their
        for name, target in targets.items():
            plan = plan_at(target, auto)
            model_q = quantize_to_plan(
                fresh(), plan, grouping.sizes(modules, plan), grouping.rounding
            )
            variants[name] = score(with_gptq(model_q, gptq_layers, plan), reference, scored, params)

    if refine == "dwq":
        # trained on the calibration text, validated on its held-out split, scored on `scored`
        train = load_calibration(tokenizer, calibration, refine_samples, seq_len, held_out_samples)
        results["refine"] = {"samples": refine_samples, "epochs": refine_epochs, "lr": refine_lr}
        dq_bpw = variants["mlx-lm dynamic_quant (4/8)"]["bpw"]
        to_refine = {
            "mix + DWQ": lambda: mix_at(target_bpw, auto),
            "mlx-lm dynamic_quant (4/8) + DWQ": dynamic_quant,
        }
        if budget.bpw(budget.low) <= dq_bpw <= budget.bpw(budget.high):
            to_refine["mix + DWQ at mlx-lm dynamic_quant (4/8)'s bpw"] = lambda: mix_at(
                dq_bpw, auto
            )
        for name, build in to_refine.items():
            quantized = build()
            info = dwq_refine(
                quantized,
                reference,
                train.calibration,
                data.held_out,
                epochs=refine_epochs,
                learning_rate=refine_lr,
            )
            variants[name] = {
                **score(quantized, reference, scored, params),
                "seconds": info["seconds"],
            }

    if exact_baseline:
        tick = time.perf_counter()
        exact = measure_sensitivities(
            copy.deepcopy(reference),
            data.calibration,
            modules,
            bits,
            grouping,
            dtype=out_dtype,
            budget=budget.for_modules(target_bpw),
            scale_bits=budget.scale_bits,
            forward_fraction=1.0,
        )
        results["exact_baseline"] = {
            "seconds": time.perf_counter() - tick,
            "forwards_per_sample": exact.forwards_per_sample,
            "measured_exactly": sum(s.measured for s in exact.modules.values()),
        }
        variants["mix (every module measured)"] = score(
            mix_at(target_bpw, exact), reference, scored, params
        )
    results["variants"] = variants
    return results


def table(results: dict) -> str:
    lines = [
        f"{results['model']}: target {results['target_bpw']} bpw, candidates "
        f"{'/'.join(map(str, results['candidate_bits']))}, group size {results['group_size']}"
        f"{' (8-bit modules in wide groups)' if results['wide_groups'] else ''}, "
        f"{results['num_samples']} x {results['seq_len']} calibration tokens of "
        f"{results['calibration']}; convert "
        f"{results['convert_seconds']:.0f} s; sensitivities "
        f"{results['report']['sensitivity']['forwards_per_sample']:.1f} forwards/sample "
        f"(naive {results['report']['sensitivity']['naive_forwards_per_sample']:.0f}) in "
        f"modes {','.join(results['report']['sensitivity']['modes'])}; scored on "
        f"{results['held_out_samples']} x {results['seq_len']} tokens of {results['held_out']}",
        "mix's bits per module kind: "
        + "; ".join(
            f"{kind} " + ", ".join(f"{n} at {b}" for b, n in sorted(counts.items()))
            for kind, counts in results["bits_by_kind"].items()
        ),
        "",
        "| variant | bpw | mean KL AR | mean KL diffusion | top-1 AR | top-1 diffusion |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in results["variants"].items():
        lines.append(
            f"| {name} | {v['bpw']:.3f} | {v['ar']['mean_kl']:.5f} "
            f"| {v['diffusion']['mean_kl']:.5f} | {v['ar']['top1']:.3f} "
            f"| {v['diffusion']['top1']:.3f} |"
        )
    if "refine" in results:
        r = results["refine"]
        timings = "; ".join(
            f"{name} {v['seconds']:.0f} s"
            for name, v in results["variants"].items()
            if "DWQ" in name
        )
        lines.append(
            f"\nDWQ: {r['samples']} x {results['seq_len']} calibration tokens, {r['epochs']} "
            f"epoch(s), learning rate {r['lr']}: {timings}"
        )
    if "gptq_seconds" in results:
        lines.append(f"\nmlx-lm GPTQ of every linear at 4 bits: {results['gptq_seconds']:.0f} s")
    if "exact_baseline" in results:
        e = results["exact_baseline"]
        lines.append(
            f"\nevery module measured: {e['forwards_per_sample']:.1f} forwards/sample, "
            f"{e['seconds']:.0f} s"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    typer.run(main)
