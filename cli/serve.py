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
    max_body_bytes: Annotated[
        int,
        typer.Option(min=1, help="Largest request body in bytes; a larger one gets HTTP 413."),
    ] = 8 << 20,
    body_timeout: Annotated[
        float,
        typer.Option(
            min=0.001, help="Seconds a client has to send its whole request body, else HTTP 408."
        ),
    ] = 30.0,
    max_connections: Annotated[
        Optional[int],
        typer.Option(
            min=1, help="Open connections served at once; more get HTTP 503 (default: no cap)."
        ),
    ] = None,
    allowed_hosts: Annotated[
        Optional[list[str]],
        typer.Option(
            "--allowed-hosts",
            metavar="HOST",
            help="Without --api-key, Host names answered besides localhost, 127.0.0.1, [::1] "
            "and --host; others get HTTP 403 (DNS rebinding). Repeat it or give a comma "
            "list; '*' allows any.",
        ),
    ] = None,
    shutdown_timeout: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Seconds running requests get on Ctrl-C before they end with an error.",
        ),
    ] = 10.0,
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
            lambda: load_model(model, decoding_only=True),
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
            max_body_bytes=max_body_bytes,
            body_timeout=body_timeout,
            max_connections=max_connections,
            allowed_hosts=tuple(
                h.strip() for value in allowed_hosts or () for h in value.split(",") if h.strip()
            ),
            shutdown_timeout=shutdown_timeout,
        )
    except ValueError as exc:  # a --mode the model lacks (run_server checks before serving)
        raise typer.BadParameter(str(exc), param_hint="--mode") from exc
