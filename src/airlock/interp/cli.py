"""`airlock` CLI commands of the interp package."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Remote interpretability: evaluator code runs sandboxed against private weights; only results leave.",
    no_args_is_help=True,
)
