"""`airlock` CLI commands of the publish package."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Publication: evaluator reports, redaction commitments, embargo, public report pages.", no_args_is_help=True
)
