"""`dhara-mlx serve`: the OpenAI-compatible HTTP server."""

from typing import Annotated, Optional

import typer

from . import app
from .generate import MaxTokens, ModelPath, ModeOption, load_model


@app.command()
def serve(
    model: ModelPath,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8080,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            envvar="DHARA_API_KEY",
            help="Require 'Authorization: Bearer KEY' on /v1 requests (default: open).",
        ),
    ] = None,
    mode: ModeOption = None,
    max_tokens: MaxTokens = 512,
    max_context: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="Longest prompt + completion in tokens "
            "(default: max_position_embeddings of config.json, else 8192).",
        ),
    ] = None,
    max_batch: Annotated[
        int, typer.Option(min=1, help="Requests decoded together in one continuous batch.")
    ] = 32,
    max_queue: Annotated[
        Optional[int],
        typer.Option(
            min=0,
            help="Requests that may wait for a batch slot; more get HTTP 429 "
            "(default: 4 x --max-batch).",
        ),
    ] = None,
    prompt_cache_bytes: Annotated[
        int,
        typer.Option(
            min=0,
            help="Bytes of state the prefix cache, shared by all requests, may hold "
            "(default 1 GiB; 0: no cache).",
        ),
    ] = 1 << 30,
    prefix_cache: Annotated[
        bool,
        typer.Option(
            help="Reuse the state of a shared prompt prefix across requests "
            "(--no-prefix-cache is --prompt-cache-bytes 0)."
        ),
    ] = True,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve POST /v1/chat/completions and /v1/completions, GET /v1/models and /health.

    A request may set mode, block_len, threshold and k besides the OpenAI
    sampling fields; --mode and --max-tokens are the defaults when it does not.
    Requests are decoded together, --max-batch at a time, in a continuous batch.
    A startup line and GET /v1/models say which modes the model has (an AR-only
    checkpoint, without a MASK token, has ar alone).
    """
    from optiq_dhara.serve.app import run_server

    try:
        run_server(
            lambda: load_model(model),
            model_id=model,
            host=host,
            port=port,
            mode=mode.value if mode else None,
            api_key=api_key,
            max_tokens=max_tokens,
            max_context=max_context,
            max_batch=max_batch,
            max_queue=max_queue,
            prompt_cache_bytes=prompt_cache_bytes if prefix_cache else 0,
            log_level=log_level,
        )
    except ValueError as exc:  # a --mode the model lacks (run_server checks before serving)
        raise typer.BadParameter(str(exc), param_hint="--mode") from exc
