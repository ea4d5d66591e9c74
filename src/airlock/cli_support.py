"""Helpers shared by the `airlock` CLI and the command groups of capability packages."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from airlock.config import Settings, get_settings
from airlock.db import Database
from airlock.errors import AirlockError

console = Console()
err = Console(stderr=True)
T = TypeVar("T")


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``message`` as one red error line and return the Exit to raise."""
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


@contextmanager
def open_database(migrate: bool = True) -> Iterator[tuple[Settings, Database]]:
    """Open the configured database (migrated to head unless told otherwise) for one command."""
    import airlock.schema  # noqa: F401  (every table and section of grant terms, for any command)

    settings = get_settings()
    db = Database(settings.db_url)
    try:
        if migrate:
            db.migrate()
        yield settings, db
    finally:
        db.dispose()


def run_command(fn: Callable[[], T]) -> T:
    """Run a command body, turning Airlock errors into one red line and exit code 1."""
    try:
        return fn()
    except AirlockError as exc:
        raise fail(exc.message) from None
    except Exception as exc:
        import openai

        # Evaluator commands talk to the lab through the openai SDK: show its errors as one line too.
        if isinstance(exc, openai.APIStatusError):
            body = exc.body if isinstance(exc.body, dict) else {}
            raise fail(f"HTTP {exc.status_code}: {body.get('message') or exc.message}") from None
        if isinstance(exc, openai.APIConnectionError):
            raise fail(f"cannot reach the lab: {exc}") from None
        raise


def fmt_ts(value: datetime | None) -> str:
    """Format a UTC timestamp for tables (``-`` when absent)."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if value else "-"


def openai_client() -> Any:
    """Return an ``openai.OpenAI`` client for the lab named by AIRLOCK_BASE_URL / AIRLOCK_API_KEY."""
    import openai

    from airlock.evals.client import LabClient

    lab = LabClient.from_env()
    return openai.OpenAI(base_url=lab.base_url, api_key=lab.api_key, max_retries=2)


def summary_table(rows: list[dict[str, Any]]) -> Table:
    """Render an audit summary as a table."""
    table = Table("actor", "variant", "status", "outcome", "requests", "tokens in", "tokens out")
    for r in rows:
        table.add_row(
            r["actor"] or "-",
            r["variant"] or "-",
            str(r["status_code"]),
            r["outcome"],
            str(r["requests"]),
            str(r["tokens_in"]),
            str(r["tokens_out"]),
        )
    return table
