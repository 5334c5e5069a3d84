"""`dhara-mlx convert`: a Hugging Face dhara checkpoint to MLX, optionally mixed-precision."""

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from optiq_dhara.quantize.refine import DWQ_EPOCHS, DWQ_LEARNING_RATE
from optiq_dhara.quantize.rounding import DEFAULT_ROUNDING, ROUNDINGS

from . import app


class Dtype(str, Enum):
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


class Method(str, Enum):
    auto = "auto"
    exact = "exact"


class Refine(str, Enum):
    none = "none"
    dwq = "dwq"


Rounding = Enum("Rounding", {name: name for name in ROUNDINGS}, type=str)


class SensitivityModes(str, Enum):
    auto = "auto"
    ar = "ar"
    ar_diffusion = "ar,diffusion"


def parse_bits(text: Optional[str]) -> Optional[list[int]]:
    """ "4,8" -> [4, 8]; a usage error for anything that is not a list of integers."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise typer.BadParameter(
            f"{text!r} is not a comma-separated list of integers, e.g. 4,8",
            param_hint="--candidate-bits",
        ) from exc


@app.command("convert")
def convert_command(
    hf_path: Annotated[
        str, typer.Option(help="Source: a local Hugging Face checkpoint directory or a Hub id.")
    ],
    mlx_path: Annotated[Path, typer.Option(help="Destination directory (written atomically).")],
    target_bpw: Annotated[
        Optional[float],
        typer.Option(
            help="Bits per weight of the mix, all stored bits counted; omit to not quantize."
        ),
    ] = None,
    candidate_bits: Annotated[
        Optional[str], typer.Option(help="Bits a module may get, comma-separated (default: 4,8).")
    ] = None,
    group_size: Annotated[
        Optional[int], typer.Option(help="Quantization group size: 32, 64 or 128 (default: 64).")
    ] = None,
    calibration: Annotated[
        Optional[Path],
        typer.Option(help="Calibration text file, or chat .jsonl (default: the shipped corpus)."),
    ] = None,
    num_samples: Annotated[
        Optional[int], typer.Option(min=1, help="Calibration sequences (default: 16).")
    ] = None,
    seq_len: Annotated[
        Optional[int], typer.Option(min=2, help="Tokens per calibration sequence (default: 256).")
    ] = None,
    dtype: Annotated[
        Optional[Dtype], typer.Option(help="Float dtype (default: config.json's torch_dtype).")
    ] = None,
    sensitivities: Annotated[
        Optional[Path], typer.Option(help="Reuse a sensitivities.json instead of measuring.")
    ] = None,
    sensitivity_method: Annotated[
        Method,
        typer.Option(help="auto: estimate, measure exactly near the cut; exact: measure all."),
    ] = Method.auto,
    sensitivity_modes: Annotated[
        SensitivityModes,
        typer.Option(
            help="Modes whose KL the sensitivities average. auto: those the weights were "
            "trained for (AR alone for a graft not yet trained jointly, config.json "
            "dhara_objective ar; AR and diffusion for a tri-mode model)."
        ),
    ] = SensitivityModes.auto,
    wide_groups: Annotated[
        bool,
        typer.Option(
            help="Store 8-bit modules in the widest group size (up to 128) their rows allow; "
            "the bits saved on scales go to upgrading other modules."
        ),
    ] = True,
    rounding: Annotated[
        Rounding,
        typer.Option(
            help="How each group's scale and bias are chosen. best: per group, whichever of "
            "MLX's grid and the min-max grid stores the weights with less squared error "
            "(same format and size; reproduces a Q4_1 GGUF's grid at group size 32); "
            "mlx: mx.quantize as it is."
        ),
    ] = Rounding(DEFAULT_ROUNDING),
    refine: Annotated[
        Refine,
        typer.Option(
            help="After allocating the bits: dwq trains the scales and biases of the modules "
            "below 8 bits so the model matches the float model on the calibration text "
            "(mlx-lm's DWQ; same size; about 5 minutes per 100 sequences of 128 tokens for "
            "a 135M model on a 2-core CPU); none keeps the rounded scales."
        ),
    ] = Refine.none,
    refine_samples: Annotated[
        Optional[int],
        typer.Option(min=1, help="Calibration sequences DWQ trains on (default: --num-samples)."),
    ] = None,
    refine_epochs: Annotated[
        int, typer.Option(min=1, help="DWQ passes over its calibration sequences.")
    ] = DWQ_EPOCHS,
    refine_lr: Annotated[
        float, typer.Option(min=0.0, help="DWQ's Adam learning rate.")
    ] = DWQ_LEARNING_RATE,
    force: Annotated[bool, typer.Option(help="Replace an existing destination.")] = False,
) -> None:
    """Convert a dhara checkpoint; with --target-bpw, a KL-sensitivity mix of candidate bits."""
    from optiq_dhara.convert import convert

    try:
        report = convert(
            hf_path,
            mlx_path,
            target_bpw=target_bpw,
            candidate_bits=parse_bits(candidate_bits),
            group_size=group_size,
            calibration=calibration,
            num_samples=num_samples,
            seq_len=seq_len,
            dtype=dtype.value if dtype else None,
            sensitivities=sensitivities,
            force=force,
            sensitivity_method=sensitivity_method.value,
            sensitivity_modes=sensitivity_modes.value,
            wide_groups=wide_groups,
            rounding=rounding.value,
            refine=refine.value,
            refine_samples=refine_samples,
            refine_epochs=refine_epochs,
            refine_learning_rate=refine_lr,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(summary(report, mlx_path))


def summary(report: dict, path: Path) -> str:
    """A few lines a user reads after converting."""
    modes = report.get("modes", ["ar", "diffusion", "spec"])
    what = f"modes {', '.join(modes)}"
    if "diffusion" not in modes:
        what += " (AR-only: no MASK token)"
    if not report.get("layers"):
        return f"wrote {path} ({report['dtype']}, {report['size_mb']:.1f} MB; {what})"
    per_bits = ", ".join(f"{n} at {b} bits" for b, n in sorted(report["modules_per_bits"].items()))
    lines = [
        f"wrote {path}: {report['achieved_bpw']:.3f} bpw (target {report['target_bpw']}), "
        f"{report['size_mb']:.1f} MB; {per_bits}; {what}",
        f"sensitivities: {report['sensitivity']['method']}, in modes "
        f"{', '.join(report['sensitivity']['modes'])}, "
        f"{report['sensitivity']['forwards_per_sample']:.1f} forwards per calibration sample",
    ]
    names = [
        n for n in ("mix", "mix_unrefined", "uniform_4", "uniform_8") if n in report["held_out"]
    ]
    refined = report.get("refine", {})
    if refined.get("method", "none") != "none":
        lines.append(
            f"refined: {refined['method']}, {refined['steps']} steps over {refined['samples']} "
            f"sequences, {refined['seconds']:.0f} s (mix_unrefined: before refinement)"
        )
    if "diffusion" not in modes:
        lines.append("held-out     mean KL (AR)   top-1 (AR)")
        for name in names:
            r = report["held_out"][name]["ar"]
            lines.append(f"  {name:13} {r['mean_kl']:.5f}     {r['top1_agreement']:.3f}")
        return "\n".join(lines)
    lines.append("held-out     mean KL (AR / diffusion)   top-1 (AR)   self-spec accepted/round")
    for name in names:
        r = report["held_out"][name]
        lines.append(
            f"  {name:10} {r['ar']['mean_kl']:.5f} / {r['diffusion']['mean_kl']:.5f}       "
            f"{r['ar']['top1_agreement']:.3f}        {r['self_spec']['accepted_per_round']:.2f}"
        )
    return "\n".join(lines)
