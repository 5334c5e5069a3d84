"""`dhara-mlx lm`: the stock mlx-lm commands, with dhara registered."""

import importlib.util
import sys
from typing import Annotated

import typer

from . import app

EXAMPLES = "generate, chat, server, lora, fuse, convert, benchmark, evaluate, perplexity, ..."


def _exists(command: str) -> bool:
    return any(
        importlib.util.find_spec(f"mlx_lm.{package}{command}") is not None
        for package in ("", "quant.")
    )


@app.command(
    context_settings={
        "allow_extra_args": True,
        "ignore_unknown_options": True,
        "allow_interspersed_args": False,
    }
)
def lm(
    ctx: typer.Context,
    command: Annotated[
        str, typer.Argument(help=f"The mlx-lm command: {EXAMPLES}", show_default=False)
    ],
) -> None:
    """Run an mlx-lm command on dhara models: dhara-mlx lm COMMAND [ITS OPTIONS].

    Everything after COMMAND goes to mlx-lm unchanged, so `dhara-mlx lm server
    --model PATH` is `mlx_lm server --model PATH` with model_type dhara_ar known;
    `dhara-mlx lm COMMAND --help` shows the command's own options.
    """
    if command.startswith("-") or not command.isidentifier() or not _exists(command):
        raise typer.BadParameter(f"{command!r} is not an mlx-lm command; try {EXAMPLES}")
    import mlx_lm.cli

    import optiq_dhara  # noqa: F401  (registers dhara with mlx-lm)

    argv = sys.argv
    sys.argv = [f"dhara-mlx lm {command}", command, *ctx.args]
    try:
        mlx_lm.cli.main()
    finally:
        sys.argv = argv
