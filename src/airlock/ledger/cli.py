"""`airlock` CLI commands of the ledger package."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Public transparency ledger: Merkle log, signed checkpoints, proofs, offline verifier.", no_args_is_help=True
)
