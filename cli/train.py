"""`dhara-mlx lora`, `dhara-mlx fuse` and `dhara-mlx train`: fine-tuning with the joint loss."""

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import app
from .hints import blas_hint

DiffusionWeight = Annotated[
    float,
    typer.Option(
        min=0.0,
        help="Weight of the block-diffusion term of the joint loss (needs the model's MASK "
        "token; 0 trains AR only, as an AR-only model must).",
    ),
]
BlockLen = Annotated[int, typer.Option(min=1, help="Block length of the diffusion term.")]
BlockContext = Annotated[
    float,
    typer.Option(
        min=0.0,
        max=1.0,
        help="Share of noisy blocks whose clean context is block-causal "
        "(as block diffusion decodes); the rest see it causal (as self-spec drafts).",
    ),
]
Iters = Annotated[int, typer.Option(min=1, help="Training steps.")]
StepsPerReport = Annotated[int, typer.Option(min=1, help="Steps between loss reports.")]
StepsPerEval = Annotated[int, typer.Option(min=1, help="Steps between validations.")]
SeedOption = Annotated[int, typer.Option(help="Seed of the noise, batches and initialization.")]
Force = Annotated[
    bool,
    typer.Option(
        help="Replace an existing output folder (never the model, adapters, tokenizer or data)."
    ),
]


class Objective(str, Enum):
    joint = "joint"
    ar = "ar"


def _report(entry: dict) -> None:
    """One JSON line per report, written around the progress bar."""
    from tqdm import tqdm

    tqdm.write(
        json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in entry.items()})
    )


def _library_errors(call):
    """Run a library call; its ValueErrors become usage errors."""
    try:
        return call()
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error


@app.command()
def lora(
    model: Annotated[
        Path, typer.Option("--model", "-m", help="Model directory (float or quantized).")
    ],
    data: Annotated[
        Path, typer.Option(help="Folder with train.jsonl (valid.jsonl, test.jsonl optional).")
    ],
    objective: Annotated[
        Objective,
        typer.Option(
            help="joint: AR + block diffusion (keeps all modes; needs the model's MASK token); "
            "ar: next-token only (an AR-only model's objective)."
        ),
    ] = Objective.joint,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 8,
    scale: Annotated[float, typer.Option(help="LoRA scale (mlx-lm's).")] = 20.0,
    iters: Iters = 1000,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per step.")] = 4,
    learning_rate: Annotated[float, typer.Option(min=0.0, help="Adam learning rate.")] = 1e-5,
    num_layers: Annotated[
        Optional[int],
        typer.Option(
            help="LoRA on the last N layers; -1 for all (default: 16, or all of a smaller model)."
        ),
    ] = None,
    mask_prompt: Annotated[
        bool, typer.Option(help="Train on completions only (chat, prompt/completion).")
    ] = False,
    adapter_path: Annotated[
        Path, typer.Option(help="Where adapters.safetensors and adapter_config.json go.")
    ] = Path("adapters"),
    diffusion_weight: DiffusionWeight = 0.3,
    block_len: BlockLen = 32,
    block_context: BlockContext = 0.5,
    max_seq_length: Annotated[
        int, typer.Option(min=1, help="Longer records are truncated.")
    ] = 2048,
    steps_per_report: StepsPerReport = 10,
    steps_per_eval: StepsPerEval = 200,
    val_batches: Annotated[int, typer.Option(min=1, help="Validation batches.")] = 25,
    spec_prompts: Annotated[
        int, typer.Option(min=0, help="Validation prompts for self-spec acceptance (0: skip).")
    ] = 4,
    seed: SeedOption = 0,
) -> None:
    """LoRA fine-tuning (QLoRA on a quantized model); reports AR and diffusion losses."""
    import optiq_dhara  # noqa: F401  (registers dhara with mlx-lm)
    from optiq_dhara.train.lora import LoraConfig, run_lora

    blas_hint()
    config = LoraConfig(
        objective=objective.value,
        rank=rank,
        scale=scale,
        num_layers=num_layers,
        iters=iters,
        batch_size=batch_size,
        learning_rate=learning_rate,
        max_seq_length=max_seq_length,
        mask_prompt=mask_prompt,
        diffusion_weight=diffusion_weight,
        block_len=block_len,
        block_context=block_context,
        steps_per_report=steps_per_report,
        steps_per_eval=steps_per_eval,
        val_batches=val_batches,
        spec_prompts=spec_prompts,
        seed=seed,
    )
    _library_errors(lambda: run_lora(model, data, adapter_path, config, _report))
    typer.echo(f"adapters saved to {adapter_path}")


@app.command()
def fuse(
    model: Annotated[Path, typer.Option("--model", "-m", help="The base model directory.")],
    adapter_path: Annotated[Path, typer.Option(help="The adapters to fold in.")] = Path("adapters"),
    save_path: Annotated[Path, typer.Option(help="Where the fused model goes.")] = Path(
        "fused_model"
    ),
    dequantize: Annotated[
        bool, typer.Option(help="Write float weights instead of re-quantizing.")
    ] = False,
    force: Force = False,
) -> None:
    """Fold LoRA adapters into the model; quantized layers keep their bits.

    The fused model is written atomically to --save-path, which may not be the base
    model's folder (nor inside it); an existing one is replaced only with --force."""
    import optiq_dhara  # noqa: F401  (registers dhara with mlx-lm)
    from optiq_dhara.train.lora import fuse as fuse_adapters

    if not (adapter_path / "adapter_config.json").is_file():
        raise typer.BadParameter(
            f"no adapter_config.json in {adapter_path}", param_hint="'--adapter-path'"
        )
    _library_errors(lambda: fuse_adapters(model, adapter_path, save_path, dequantize, force))
    typer.echo(f"fused model saved to {save_path}")


@app.command("train")
def train_command(
    data: Annotated[
        Path, typer.Option(help='Text corpus: a .txt, a .jsonl of {"text"}, or a folder of them.')
    ],
    out: Annotated[Path, typer.Option(help="Where the trained model goes.")],
    model: Annotated[
        Optional[Path], typer.Option("--model", "-m", help="Checkpoint to continue from.")
    ] = None,
    config: Annotated[
        Optional[Path], typer.Option(help="config.json to start fresh weights from.")
    ] = None,
    tokenizer: Annotated[
        Optional[Path],
        typer.Option(help="Tokenizer folder (default: next to the model or config)."),
    ] = None,
    iters: Iters = 1000,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows per step.")] = 8,
    seq_len: Annotated[int, typer.Option(min=2, help="Tokens per window.")] = 256,
    learning_rate: Annotated[float, typer.Option(min=0.0, help="AdamW peak learning rate.")] = 1e-3,
    warmup: Annotated[int, typer.Option(min=0, help="Linear warmup steps.")] = 50,
    weight_decay: Annotated[float, typer.Option(min=0.0)] = 0.01,
    held_out: Annotated[
        float, typer.Option(min=0.0, max=0.5, help="Fraction of the corpus held out.")
    ] = 0.05,
    diffusion_weight: DiffusionWeight = 0.3,
    block_len: BlockLen = 32,
    block_context: BlockContext = 0.5,
    steps_per_report: StepsPerReport = 10,
    steps_per_eval: StepsPerEval = 200,
    seed: SeedOption = 0,
    force: Force = False,
) -> None:
    """Full-parameter training on a text corpus with the joint loss (RoPE frequencies stay frozen).

    The model is written atomically to --out at the end; an existing --out is
    refused before training unless --force."""
    import optiq_dhara  # noqa: F401  (registers dhara with mlx-lm)
    from optiq_dhara.train.full import run
    from optiq_dhara.train.trainer import TrainConfig

    blas_hint()

    settings = TrainConfig(
        iters=iters,
        learning_rate=learning_rate,
        warmup=warmup,
        cosine=True,
        weight_decay=weight_decay,
        diffusion_weight=diffusion_weight,
        block_len=block_len,
        block_context=block_context,
        steps_per_report=steps_per_report,
        steps_per_eval=steps_per_eval,
        seed=seed,
    )
    _library_errors(
        lambda: run(
            data,
            out,
            model=model,
            config=config,
            tokenizer=tokenizer,
            seq_len=seq_len,
            batch_size=batch_size,
            held_out=held_out,
            train_config=settings,
            report=_report,
            force=force,
        )
    )
    typer.echo(f"model saved to {out}")
