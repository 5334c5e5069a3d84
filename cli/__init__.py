"""The ``dhara-mlx`` command line: each command parses its options and calls the library."""

import typer

app = typer.Typer(
    name="dhara-mlx",
    help="dhara language models on MLX: convert, generate, serve, train and evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def main() -> None:
    app()


from . import bench, convert, evaluate, generate, lm, serve, train  # noqa: E402,F401  (register commands)
