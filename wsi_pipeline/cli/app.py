"""The one typer app and the one way a command ends on a user-facing error (one line, exit status 1)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, NoReturn, TypeVar

import typer

# `--record-failures`: what a cohort run does with a bad slide, for the per-slide verbs
RecordFailures = Annotated[
    bool, typer.Option(help="record a bad slide in its sidecar and exit 0 (what a cohort run does)")
]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Whole-slide images in; tiles, embeddings, MIL models and explanations out.",
)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    from ..jobguard import guard_parent

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    # progress of long work (tiles encoded, rate, time left) is shown even when other logging is quiet
    logging.getLogger("wsi_pipeline.progress").setLevel(logging.INFO)
    guard_parent()  # a workflow job ends when the Snakemake process that started it is killed


def exit_with_error(err: Exception | str) -> NoReturn:
    """CLI ending for a user-facing error: its one line on stderr, exit status 1, no traceback."""
    typer.echo(f"error: {' '.join(str(err).split())}", err=True)
    raise typer.Exit(code=1)


T = TypeVar("T")


def run_or_exit(fn: Callable[[], T]) -> T:
    """`fn()`, or the CLI's ending for a user-facing `PipelineError` it raises (one line, exit status 1)."""
    from ..errors import PipelineError

    try:
        return fn()
    except PipelineError as err:
        exit_with_error(err)
