"""`dhara-mlx bench`: speed of AR, block diffusion and self-speculation."""

import json
import os
import sys
import tempfile
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import app
from .generate import BlockLen, Mode, SpecK, Threshold, check_context, load_model
from .hints import blas_hint


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def _write_json(path: Path, data: dict) -> None:
    """Write atomically: a temp file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


@app.command()
def bench(
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model", "-m", help="Model directory; default: random dhara-250m-shaped weights."
        ),
    ] = None,
    dtype: Annotated[DType, typer.Option(help="dtype of the random weights.")] = DType.float32,
    prompt_lens: Annotated[
        list[int], typer.Option("--prompt-len", min=1, help="Prompt length (repeatable).")
    ] = [16, 512],
    modes: Annotated[
        Optional[list[Mode]],
        typer.Option(
            "--mode",
            help="Mode to time (repeatable; default: every mode the model has, "
            "ar alone for an AR-only model without a MASK token).",
        ),
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate per run.")] = 16,
    block_len: BlockLen = None,
    threshold: Threshold = 0.5,
    k: SpecK = 8,
    reference: Annotated[
        Optional[bool],
        typer.Option(
            help="Also time the uncached diffusion reference at the longest prompt "
            "(default: when the model has diffusion)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random weights and prompts.")] = 0,
    repeats: Annotated[
        int, typer.Option(min=1, help="Runs per mode and length, taking turns; the fastest counts.")
    ] = 1,
    prompt_file: Annotated[
        Optional[Path],
        typer.Option(
            dir_okay=False,
            help="Cut the prompts from this text (with --model; tokenized by its tokenizer; "
            "- reads stdin).",
        ),
    ] = None,
    json_path: Annotated[
        Optional[Path], typer.Option("--json", help="Also write the results to this JSON file.")
    ] = None,
) -> None:
    """Time each decoding mode: tokens/s, tokens per forward, drafts accepted per round,
    time to first token, peak memory and weight bandwidth (model bytes x tokens/s)."""
    import mlx.core as mx

    from optiq_dhara.runtime import bench as runtime_bench

    text_ids = None
    if model is None:
        if prompt_file is not None:
            raise typer.BadParameter(
                "needs --model (whose tokenizer reads it)", param_hint="--prompt-file"
            )
        blas_hint()
        loaded = runtime_bench.random_model(getattr(mx, dtype.value), seed)
        name = f"random dhara-250m {dtype.value}"
    else:
        loaded, tokenizer = load_model(model)
        name = Path(model).name
        check_context(loaded, max(prompt_lens), max_tokens, param_hint="--prompt-len")
        if prompt_file is not None:
            if str(prompt_file) == "-":
                text = sys.stdin.read()
            elif prompt_file.is_file():
                text = prompt_file.read_text()
            else:
                raise typer.BadParameter(
                    f"{prompt_file}: no such file", param_hint="'--prompt-file'"
                )
            text_ids = tokenizer.encode(text)
    has = loaded.args.modes
    try:
        rows, ref = runtime_bench.run_bench(
            loaded,
            name,
            prompt_lengths=prompt_lens,
            modes=[m.value for m in modes] if modes else has,
            max_tokens=max_tokens,
            block_len=block_len,
            threshold=threshold,
            k=k,
            reference="diffusion" in has if reference is None else reference,
            seed=seed,
            text_ids=text_ids,
            repeats=repeats,
            progress=lambda row: typer.echo(
                f"{row.mode:>9} prompt {row.prompt_tokens:>5}: {row.tokens_per_second:.2f} tok/s",
                err=True,
            ),
        )
    except ValueError as exc:  # a mode the model lacks, refused before any run
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(runtime_bench.format_results(rows, ref))
    if json_path is not None:
        _write_json(json_path, runtime_bench.as_dicts(rows, ref))
