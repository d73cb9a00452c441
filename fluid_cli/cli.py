"""The `fluid` command. Each subcommand is thin: parse, load the recipe, call the module's `run`.

Heavy imports (torch, transformers) happen inside the commands so that `fluid --help` stays fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from fluid_cli import __version__
from fluid_cli.errors import FluidError

app = typer.Typer(
    name="fluid",
    help="FLUID: adapt a causal LM to write several tokens per forward pass, decode it, and measure it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True, soft_wrap=True)

RecipeArg = Annotated[Path, typer.Argument(help="TOML recipe file.", show_default=False)]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a recipe value, e.g. --set train.lr=1e-4 (repeatable).", show_default=False),
]


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a `FluidError` into one red line on stderr and exit status 2 (no traceback)."""
    try:
        yield
    except FluidError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}")
        raise typer.Exit(2) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fluid {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """FLUID toolkit."""


@app.command("recipe")
def recipe(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Validate a recipe and print it fully resolved (defaults filled in, overrides applied)."""
    from fluid_cli.config import dump_recipe, load_recipe

    with user_errors():
        typer.echo(dump_recipe(load_recipe(recipe, set_)), nl=False)


def main() -> None:
    app()
