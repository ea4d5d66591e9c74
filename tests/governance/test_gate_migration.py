"""The 0008 migration creates exactly the governance tables the models declare."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from airlock.schema import metadata

TABLES = {"gate_decisions", "gate_overrides"}


def _tables_of(diff: Any) -> set[str]:
    names: set[str] = set()
    for item in diff if isinstance(diff, list) else [diff]:
        for part in item if isinstance(item, tuple) else (item,):
            table = getattr(part, "table", None)
            name = getattr(table, "name", None) or getattr(part, "name", None)
            if isinstance(name, str):
                names.add(name)
            elif isinstance(part, str):
                names.add(part)
    return names


def test_migration_matches_models(db: Any) -> None:
    with db.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": False}), metadata)
    ours = [d for d in diffs if _tables_of(d) & TABLES]
    assert ours == []
    with db.engine.connect() as conn:
        from sqlalchemy import inspect

        assert set(inspect(conn).get_table_names()) >= TABLES
