"""`dhara-mlx eval`: lm-eval tasks in AR or diffusion mode, perplexity and divergence."""

from enum import Enum
from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import app
from .generate import ModelPath, Threshold, load_model


class EvalMode(str, Enum):
    ar = "ar"
    diffusion = "diffusion"


@app.command("eval")
def eval_command(
    model: ModelPath,
    tasks: Annotated[
        Optional[str],
        typer.Option(help="Comma-separated lm-eval tasks, e.g. piqa,arc_easy,sciq."),
    ] = None,
    mode: Annotated[
        EvalMode,
        typer.Option(
            help="Scoring: ar (causal) or diffusion (the answer masked, block-causal forward; "
            "needs the model's MASK token, which an AR-only model lacks)."
        ),
    ] = EvalMode.ar,
    num_shots: Annotated[Optional[int], typer.Option(min=0, help="Few-shot examples.")] = None,
    limit: Annotated[
        Optional[float],
        typer.Option(min=0.0, help="Items per task (a fraction when below 1; for quick runs)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward.")] = 8,
    block_len: Annotated[
        int, typer.Option(min=1, help="Diffusion: block length of the global block grid.")
    ] = 32,
    threshold: Threshold = 0.5,
    max_length: Annotated[
        Optional[int],
        typer.Option(
            min=2,
            help="Longest scored sequence in tokens "
            "(default: max_position_embeddings of config.json, else 2048).",
        ),
    ] = None,
    include_path: Annotated[
        Optional[list[Path]],
        typer.Option(help="Folder of local lm-eval task YAML files (repeatable)."),
    ] = None,
    perplexity: Annotated[
        Optional[Path],
        typer.Option(
            help="Text file: perplexity in AR and diffusion forwards (AR alone for an "
            "AR-only model)."
        ),
    ] = None,
    reference: Annotated[
        Optional[str],
        typer.Option(
            help="Float or base model: mean KL, top-1 agreement and perplexity ratio "
            "against it on the --perplexity file."
        ),
    ] = None,
    seq_len: Annotated[
        int, typer.Option(min=2, help="Tokens per row of the --perplexity file.")
    ] = 512,
    seed: Annotated[
        int, typer.Option(help="Seed of few-shot sampling and diffusion masks.")
    ] = 1234,
    output: Annotated[Optional[Path], typer.Option(help="Write all results as JSON here.")] = None,
) -> None:
    """Evaluate a dhara model: lm-eval tasks (--tasks), text perplexity (--perplexity),
    and divergence from a reference model (--reference)."""
    from optiq_dhara.evaluate.report import divergence_table, write_json

    task_list = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if reference is not None and perplexity is None:
        raise typer.BadParameter(
            "--reference compares on a text file: give --perplexity FILE too",
            param_hint="--reference",
        )
    if not task_list and perplexity is None:
        raise typer.BadParameter("give --tasks and/or --perplexity FILE", param_hint="--tasks")
    lm_model, tokenizer = load_model(model)
    ref_model = None
    if reference is not None:  # checked before any task runs
        ref_model, ref_tokenizer = load_model(reference, param_hint="'--reference'")
        check_same_tokenizer(tokenizer, ref_tokenizer, model, reference)
    results: dict = {}
    if task_list:
        harness = _harness()
        try:
            lm = harness.DharaLM(
                lm_model,
                tokenizer,
                name=model,
                mode=mode.value,
                batch_size=batch_size,
                block_len=block_len,
                threshold=threshold,
                max_length=max_length,
            )
        except ValueError as exc:  # diffusion scoring of a model without a MASK token
            raise typer.BadParameter(str(exc), param_hint="--mode") from exc
        try:
            results = harness.run_tasks(
                lm,
                task_list,
                num_shots=num_shots,
                limit=limit,
                include_path=include_path,
                seed=seed,
            )
        except harness.UnknownTaskError as exc:
            raise typer.BadParameter(str(exc), param_hint="--tasks") from exc
        from lm_eval.utils import make_table

        typer.echo(make_table(results))
    if perplexity is not None:
        from tqdm import tqdm

        from optiq_dhara.evaluate.divergence import text_divergence

        try:
            report = text_divergence(
                lm_model,
                tokenizer,
                perplexity,
                ref_model,
                seq_len=seq_len,
                block_len=block_len,
                batch_size=batch_size,
                seed=seed,
                progress=partial(tqdm, desc="perplexity", unit="row", leave=False),
            )
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--perplexity") from exc
        results["perplexity"] = {"reference": reference, **report}
        typer.echo(divergence_table(report))
    if output is not None:
        write_json(results, output)
        typer.echo(f"wrote {output}")


def check_same_tokenizer(tokenizer, ref_tokenizer, model: str, reference: str) -> None:
    """Refuse a reference whose tokenizer maps tokens to other ids than the model's:
    their logits would be compared position by position over different vocabularies."""
    vocab, ref_vocab = tokenizer.get_vocab(), ref_tokenizer.get_vocab()
    if vocab == ref_vocab:
        return
    differ = sum(vocab.get(token) != ref_vocab.get(token) for token in {*vocab, *ref_vocab})
    raise typer.BadParameter(
        f"{reference} does not share the tokenizer of {model}: vocabularies of {len(ref_vocab)} "
        f"and {len(vocab)} tokens, {differ} tokens have another id or are missing in one; "
        "compare a model with its own float or base model",
        param_hint="'--reference'",
    )


def _harness():
    """The lm-eval adapter module, or a usage error when lm-eval is not installed."""
    try:
        from optiq_dhara.evaluate import harness
    except ImportError as exc:
        raise typer.BadParameter(
            f"--tasks needs lm-evaluation-harness ({exc}): pip install 'optiq-dhara[eval]'",
            param_hint="--tasks",
        ) from exc
    return harness
