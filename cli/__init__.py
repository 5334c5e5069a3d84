"""The ``dhara-mlx`` command line: each command parses its options and calls the library."""

import typer

app = typer.Typer(
    name="dhara-mlx",
    help="dhara language models on MLX: convert, graft, generate, serve, train and evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"dhara-mlx (optiq-dhara) {version('optiq-dhara')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the version of optiq-dhara and exit.",
    ),
) -> None:
    pass


def main() -> None:
    app()


from . import bench, convert, evaluate, generate, graft, lm, serve, train  # noqa: E402,F401  (register commands)
