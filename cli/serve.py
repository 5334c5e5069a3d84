"""`dhara-mlx serve`: the OpenAI-compatible HTTP server."""

from typing import Annotated, Optional

import typer

from . import app
from .generate import MaxTokens, Mode, ModelPath, ModeOption, load_model


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
    mode: ModeOption = Mode.spec,
    max_tokens: MaxTokens = 512,
    max_context: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="Longest prompt + completion in tokens "
            "(default: max_position_embeddings of config.json, else 8192).",
        ),
    ] = None,
    prefix_cache: Annotated[
        bool, typer.Option(help="Reuse the state of a shared prompt prefix across requests.")
    ] = True,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve POST /v1/chat/completions and /v1/completions, GET /v1/models and /health.

    A request may set mode, block_len, threshold and k besides the OpenAI
    sampling fields; --mode and --max-tokens are the defaults when it does not.
    """
    from optiq_dhara.serve.app import run_server

    run_server(
        lambda: load_model(model),
        model_id=model,
        host=host,
        port=port,
        mode=mode.value,
        api_key=api_key,
        max_tokens=max_tokens,
        max_context=max_context,
        prefix_cache=prefix_cache,
        log_level=log_level,
    )
