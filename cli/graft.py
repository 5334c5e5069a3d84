"""`dhara-mlx graft`: a pretrained LLaMA-family model (HF directory, Hub id, GGUF) as dhara."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import app
from .convert import Dtype

HELP = "\n\n".join(
    [
        "Graft a pretrained LLaMA-family model into a dhara checkpoint.",
        "The result computes exactly what the source computes: its AR logits equal mlx-lm's "
        "llama on the same weights (checked before writing). Every Canon site is present with "
        "zero taps (the identity), QK-norm and the logit soft-cap are off, and the vocabulary "
        "gets a MASK token (<|mask|>, id = the source's vocabulary size) whose embedding row "
        "is the mean row. It loads with mlx_lm.load after `import optiq_dhara` and decodes in "
        "all three modes; diffusion and self-speculation become useful only after joint "
        "training (dhara-mlx lora --objective joint, or dhara-mlx train --diffusion-weight "
        "above 0).",
        "--from takes a Hugging Face directory or Hub id with model_type llama (or mistral "
        "without a sliding window; safetensors weights and tokenizer files), or a GGUF file "
        "of the llama architecture (F32, F16, Q4_0, Q4_1, Q8_0 and other types MLX reads, "
        "dequantized). A GGUF's byte-level BPE tokenizer (tokenizer.ggml.model gpt2, pre-tokenizer "
        "gpt2 or smollm: SmolLM2's) is rebuilt from its metadata; for other GGUF tokenizers "
        "pass --tokenizer, the Hugging Face tokenizer directory (or Hub id) of the same model.",
    ]
)


@app.command("graft", help=HELP)
def graft_command(
    source: Annotated[
        str,
        typer.Option(
            "--from",
            help="Source: a Hugging Face LLaMA-family directory or Hub id, or a .gguf file.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Destination directory (written atomically).")],
    tokenizer: Annotated[
        Optional[str],
        typer.Option(
            help="Hugging Face tokenizer directory or Hub id of the same model: replaces the "
            "source's own (a GGUF's byte-level BPE tokenizer is rebuilt from its metadata; "
            "other GGUF tokenizers need this)."
        ),
    ] = None,
    dtype: Annotated[
        Optional[Dtype],
        typer.Option(
            help="Float dtype of the weights (default: the source's; float16 for a quantized GGUF)."
        ),
    ] = None,
    mask_token: Annotated[
        str, typer.Option(help="Text of the MASK token added to the tokenizer.")
    ] = "<|mask|>",
    check: Annotated[
        bool,
        typer.Option(
            help="Compare the grafted model's logits with mlx-lm's llama on the same weights "
            "before writing (one short forward of each)."
        ),
    ] = True,
    revision: Annotated[
        Optional[str], typer.Option(help="Hub revision (branch, tag or commit) of a Hub id.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing destination.")] = False,
) -> None:
    from optiq_dhara.convert.graft import graft

    try:
        report = graft(
            source,
            out,
            force=force,
            dtype=dtype.value if dtype else None,
            tokenizer=tokenizer,
            mask_token=mask_token,
            check=check,
            revision=revision,
            progress=True,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(summary(report))


def summary(report: dict) -> str:
    """What a user reads after grafting."""
    head = "tied" if report["tie_word_embeddings"] else "untied"
    lines = [
        f"wrote {report['out']} ({report['dtype']}, {report['layers']} layers, hidden "
        f"{report['hidden_size']}, {report['parameters'] / 1e6:.1f} M parameters, {head} head) "
        f"from {report['format'].upper()} {report['source']}",
        f"vocabulary {report['source_vocab_size']} -> {report['vocab_size']}: MASK is id "
        f"{report['mask_token_id']}"
        + (f"; {report['reserved_tokens']} reserved tokens" if report["reserved_tokens"] else ""),
    ]
    check = report["check"]
    if check:
        lines.append(
            f"check against mlx-lm's llama on {check['tokens']} tokens: max |logit diff| "
            f"{check['max_abs_logit_diff']:.2g}, top-1 agreement {check['top1_agreement']:.0%}"
        )
    lines.append(
        "modes ar, diffusion, spec (MASK untrained: train with the joint objective before "
        "using diffusion or spec)"
    )
    return "\n".join(lines)
