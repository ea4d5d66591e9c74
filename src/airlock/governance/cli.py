"""`airlock` CLI commands of the governance package."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Governance: frontier-safety policy, safety case per mitigation, deployment gate, overrides.",
    no_args_is_help=True,
)
