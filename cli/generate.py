"""`dhara-mlx generate` and `dhara-mlx chat`, and the decoding options they share with `serve`."""

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import app


class Mode(str, Enum):
    ar = "ar"
    diffusion = "diffusion"
    spec = "spec"


ModelPath = Annotated[
    str, typer.Option("--model", "-m", help="Model directory (or Hugging Face repo id).")
]
ModeOption = Annotated[
    Optional[Mode],
    typer.Option(
        help="Decoding: ar (one token per forward), diffusion (block diffusion), "
        "spec (diffusion drafts, AR verifies: AR's output, faster). Diffusion and spec "
        "need the model's MASK token; default: spec, or ar for an AR-only model (no MASK)."
    ),
]
MaxTokens = Annotated[int, typer.Option(min=1, help="Most tokens to generate.")]
Temperature = Annotated[
    float, typer.Option("--temp", min=0.0, help="Sampling temperature; 0 = greedy.")
]
TopP = Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass (1 = off).")]
TopK = Annotated[int, typer.Option(min=0, help="Keep the k likeliest tokens (0 = off).")]
MinP = Annotated[
    float, typer.Option(min=0.0, max=1.0, help="Drop tokens below min-p x the top probability.")
]
RepetitionPenalty = Annotated[
    float, typer.Option(min=0.0, help="Penalty on tokens already in the sequence (1 = off).")
]
Seed = Annotated[Optional[int], typer.Option(help="Seed of sampling (same seed, same text).")]
BlockLen = Annotated[
    int, typer.Option(min=1, help="Block length of diffusion and of spec's draft grid.")
]
Threshold = Annotated[
    float,
    typer.Option(min=0.0, max=1.0, help="Diffusion: commit every position this confident."),
]
SpecK = Annotated[
    int, typer.Option("--k", min=2, help="Spec: window of the anchor plus k-1 draft tokens.")
]
System = Annotated[Optional[str], typer.Option(help="System message for the chat template.")]


def load_model(path: str):
    """(model, tokenizer) of ``path``, or a usage error naming it."""
    import mlx_lm

    import optiq_dhara  # noqa: F401  (registers dhara with mlx-lm)

    try:
        return mlx_lm.load(path)
    except Exception as exc:
        hint = (
            "" if Path(path).exists() else " (no such directory, nor a reachable Hugging Face repo)"
        )
        raise typer.BadParameter(
            f"could not load a model from {path!r}{hint}: {exc}", param_hint="'--model'"
        ) from exc


def describe_modes(model) -> str:
    """Which decoding modes the loaded model has, and why when some are missing."""
    modes = ", ".join(model.args.modes)
    if model.args.mask_token_id is not None:
        return f"modes {modes}"
    return f"modes {modes}: an AR-only checkpoint, without the MASK token diffusion and spec need"


def pick_mode(mode: Optional[Mode], model) -> str:
    """The mode to decode in: the one asked for, if the model has it, else the model's
    default; a usage error naming the missing MASK token otherwise."""
    from optiq_dhara.runtime.settings import default_mode, require_mode

    if mode is None:
        return default_mode(model.args)
    try:
        require_mode(model.args, mode.value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--mode") from exc
    return mode.value


def format_stats(stats) -> str:
    """One line a user of an inference engine wants: speed, forwards, acceptance."""
    first = stats.time_to_first_token
    return (
        f"[{stats.mode}] {stats.generated} tokens, {stats.tokens_per_second:.1f} tok/s, "
        f"{stats.tokens_per_forward:.2f} tokens/forward ({stats.forwards} forwards), "
        f"{stats.accepted_drafts} drafts accepted ({stats.accepted_per_round:.2f}/round), "
        f"first token {first * 1000 if first is not None else 0:.0f} ms, "
        f"prompt {stats.prompt_tokens} tokens ({stats.reused_tokens} reused), "
        f"finish: {stats.finish_reason}"
    )


def _print_reply(chunks) -> None:
    """Stream the text to stdout, then the stats line to stderr."""
    last = None
    try:
        for chunk in chunks:
            typer.echo(chunk.text, nl=False)
            last = chunk
    except ValueError as exc:  # the runtime refused the prompt or an option
        raise typer.BadParameter(str(exc)) from exc
    typer.echo()
    if last is not None:
        typer.echo(format_stats(last.stats), err=True)


def _decoding(
    mode: str,
    max_tokens: int,
    temp: float,
    top_p: float,
    top_k: int,
    min_p: float,
    repetition_penalty: float,
    seed: Optional[int],
    block_len: int,
    threshold: float,
    k: int,
) -> dict:
    """The runtime's decoding keywords from the shared command options."""
    return dict(
        mode=mode,
        max_tokens=max_tokens,
        temperature=temp,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        block_len=block_len,
        threshold=threshold,
        k=k,
    )


@app.command()
def generate(
    model: ModelPath,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt text.")],
    mode: ModeOption = None,
    chat: Annotated[
        bool, typer.Option(help="Wrap the prompt as a user message in the chat template.")
    ] = False,
    system: System = None,
    max_tokens: MaxTokens = 256,
    temp: Temperature = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = None,
    stop: Annotated[
        Optional[list[str]], typer.Option(help="Stop at this text (repeatable); it is not printed.")
    ] = None,
    block_len: BlockLen = 32,
    threshold: Threshold = 0.5,
    k: SpecK = 8,
) -> None:
    """Generate from a prompt, streaming the text; a stats line follows on stderr."""
    from optiq_dhara.runtime import stream_text

    loaded, tokenizer = load_model(model)
    mode = pick_mode(mode, loaded)
    if loaded.args.mask_token_id is None:  # say why the default is ar
        typer.echo(f"{model}: {describe_modes(loaded)}", err=True)
    source = prompt
    if chat:
        source = [{"role": "system", "content": system}] if system else []
        source.append({"role": "user", "content": prompt})
    chunks = stream_text(
        loaded,
        tokenizer,
        source,
        chat=chat,
        stop=tuple(stop or ()),
        **_decoding(
            mode,
            max_tokens,
            temp,
            top_p,
            top_k,
            min_p,
            repetition_penalty,
            seed,
            block_len,
            threshold,
            k,
        ),
    )
    _print_reply(chunks)


@app.command()
def chat(
    model: ModelPath,
    mode: ModeOption = None,
    system: System = None,
    max_tokens: MaxTokens = 512,
    temp: Temperature = 0.7,
    top_p: TopP = 0.9,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.15,
    seed: Seed = None,
    block_len: BlockLen = 32,
    threshold: Threshold = 0.5,
    k: SpecK = 8,
) -> None:
    """Chat in the terminal, one line per turn; the history is kept.

    Type /mode ar|diffusion|spec to switch decoding, /reset to forget the
    history, /quit (or end of input) to leave. Sampling defaults are the model
    card's chat settings.
    """
    from optiq_dhara.serve.console import HELP, ChatSession

    loaded, tokenizer = load_model(model)
    mode = pick_mode(mode, loaded)
    session = ChatSession(
        loaded,
        tokenizer,
        system=system,
        **_decoding(
            mode,
            max_tokens,
            temp,
            top_p,
            top_k,
            min_p,
            repetition_penalty,
            seed,
            block_len,
            threshold,
            k,
        ),
    )
    typer.echo(f"chatting with {model} in {session.mode} mode ({describe_modes(loaded)}); {HELP}")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if line in ("/quit", "/exit"):
            break
        if not line:
            continue
        if line.startswith("/"):
            try:
                typer.echo(session.command(line))
            except ValueError as exc:
                typer.echo(str(exc), err=True)
            continue
        _print_reply(session.reply(line))
