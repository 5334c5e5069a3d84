"""`dhara-mlx generate` and `dhara-mlx chat`, and the decoding options they share with `serve`."""

import re
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import app
from .hints import blas_hint


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
    Optional[int],
    typer.Option(
        min=1,
        help="Block length of diffusion and of spec's draft grid (default: the model's; "
        "32 for dhara).",
    ),
]
Threshold = Annotated[
    float,
    typer.Option(min=0.0, max=1.0, help="Diffusion: commit every position this confident."),
]
SpecK = Annotated[
    int, typer.Option("--k", min=2, help="Spec: window of the anchor plus k-1 draft tokens.")
]
Steps = Annotated[
    Optional[int],
    typer.Option(
        min=1,
        help="arcLM (BD3LM) diffusion: denoising steps per block (default: the block "
        "length, one token a step).",
    ),
]
System = Annotated[Optional[str], typer.Option(help="System message for the chat template.")]


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(path: str) -> bool:
    """Whether ``path`` names a Hugging Face repo (owner/name) rather than a local folder."""
    return not Path(path).exists() and HUB_ID.fullmatch(path) is not None


def load_model(path: str, param_hint: str = "'--model'", decoding_only: bool = False):
    """(model, tokenizer) of ``path``, or a usage error naming what is wrong.

    A local folder is checked first (``optiq_dhara.checkpoint.load``): a folder
    that is not a dhara checkpoint, a missing or corrupt config.json or
    tokenizer, weights that do not fit the config, each get a message naming the
    file; a Hugging Face repo id is downloaded by mlx-lm and must hold a dhara.
    ``decoding_only`` commands (generate, chat, serve) also run arcLM checkpoints.
    """
    import mlx_lm

    import optiq_dhara  # noqa: F401  (registers dhara with mlx-lm)
    from optiq_dhara.arclm.model import Model as ArcLM
    from optiq_dhara.checkpoint import DECODING_TYPES, MODEL_TYPE
    from optiq_dhara.checkpoint import load as checked_load
    from optiq_dhara.model import Model

    blas_hint()
    if not is_hub_id(path):
        try:
            return checked_load(path, DECODING_TYPES if decoding_only else (MODEL_TYPE,))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint=param_hint) from exc
    try:
        model, tokenizer = mlx_lm.load(path)
    except Exception as exc:
        raise typer.BadParameter(
            f"could not load a model from {path!r} (no such directory, nor a reachable "
            f"Hugging Face repo): {exc}",
            param_hint=param_hint,
        ) from exc
    if not isinstance(model, (Model, ArcLM) if decoding_only else Model):
        raise typer.BadParameter(
            f"{path!r} is a {type(model).__module__.rsplit('.', 1)[-1]} model, not a dhara "
            "checkpoint (model_type dhara_ar)",
            param_hint=param_hint,
        )
    return model, tokenizer


def read_prompt(text: str) -> str:
    """The prompt option's text; ``-`` reads it from standard input."""
    return sys.stdin.read() if text == "-" else text


def check_context(model, prompt_tokens: int, max_tokens: int, param_hint: str = "--max-tokens"):
    """Refuse a prompt plus generation longer than the model's context
    (``max_position_embeddings`` of config.json, when it has one)."""
    limit = getattr(model.args, "max_position_embeddings", None)
    if limit and prompt_tokens + max_tokens > limit:
        raise typer.BadParameter(
            context_message(prompt_tokens, max_tokens, limit), param_hint=param_hint
        )


def context_message(prompt_tokens: int, max_tokens: int, limit: int) -> str:
    return (
        f"a prompt of {prompt_tokens} tokens plus {max_tokens} new tokens is "
        f"{prompt_tokens + max_tokens} tokens, beyond the model's context of {limit} "
        "(max_position_embeddings in its config.json): shorten the prompt or lower --max-tokens"
    )


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
    steps: Optional[int],
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
        steps=steps,
    )


@app.command()
def generate(
    model: ModelPath,
    prompt: Annotated[
        str, typer.Option("--prompt", "-p", help="The prompt text; - reads it from stdin.")
    ],
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
    block_len: BlockLen = None,
    threshold: Threshold = 0.5,
    k: SpecK = 8,
    steps: Steps = None,
) -> None:
    """Generate from a prompt, streaming the text; a stats line follows on stderr."""
    from optiq_dhara.runtime import stream_text
    from optiq_dhara.runtime.text import encode_prompt

    prompt = read_prompt(prompt)
    loaded, tokenizer = load_model(model, decoding_only=True)
    mode = pick_mode(mode, loaded)
    if loaded.args.mask_token_id is None:  # say why the default is ar
        typer.echo(f"{model}: {describe_modes(loaded)}", err=True)
    source = prompt
    if chat:
        source = [{"role": "system", "content": system}] if system else []
        source.append({"role": "user", "content": prompt})
    check_context(loaded, len(encode_prompt(tokenizer, source, chat=chat)), max_tokens)
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
            steps,
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
    block_len: BlockLen = None,
    threshold: Threshold = 0.5,
    k: SpecK = 8,
    steps: Steps = None,
) -> None:
    """Chat in the terminal, one line per turn; the history is kept.

    Type /mode ar|diffusion|spec to switch decoding, /reset to forget the
    history, /quit (or end of input) to leave. Sampling defaults are the model
    card's chat settings.
    """
    from optiq_dhara.serve.console import HELP, ChatSession

    loaded, tokenizer = load_model(model, decoding_only=True)
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
            steps,
        ),
    )
    limit = loaded.args.max_position_embeddings
    if limit and max_tokens >= limit:
        check_context(loaded, 1, max_tokens)  # no turn could fit: refused at once
    typer.echo(f"chatting with {model} in {session.mode} mode ({describe_modes(loaded)}); {HELP}")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        except KeyboardInterrupt:  # Ctrl-C at the prompt leaves
            typer.echo()
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
        if not _turn_fits(session, tokenizer, line, max_tokens):
            continue
        _chat_reply(session, line)


def _turn_fits(session, tokenizer, line: str, max_tokens: int) -> bool:
    """Whether the history, this turn and the reply fit the model's context; says why not."""
    from optiq_dhara.runtime.text import encode_prompt

    limit = session.model.args.max_position_embeddings
    if not limit:
        return True
    messages = session.history + [{"role": "user", "content": line}]
    tokens = len(encode_prompt(tokenizer, messages, chat=True))
    if tokens + max_tokens <= limit:
        return True
    typer.echo(
        f"{context_message(tokens, max_tokens, limit)}; /reset forgets the history", err=True
    )
    return False


def _chat_reply(session, line: str) -> None:
    """Stream one reply; Ctrl-C ends the reply (what was written stays in the history),
    not the chat."""
    from optiq_dhara.runtime import PrefixCache

    chunks = session.reply(line)
    try:
        _print_reply(chunks)
    except KeyboardInterrupt:
        chunks.close()  # records the partial answer in the history
        session.prefix_cache = PrefixCache()  # an interrupted step may have left it half-made
        typer.echo()
        typer.echo("[interrupted]", err=True)
