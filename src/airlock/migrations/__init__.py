"""Alembic migrations for Airlock's schema, run programmatically (no alembic.ini needed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

__all__ = ["SchemaState", "alembic_config", "schema_state", "upgrade"]

HERE = Path(__file__).parent


def alembic_config(engine: Engine) -> Config:
    """Return an Alembic config bound to ``engine``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema of ``engine``'s database to ``revision``."""
    command.upgrade(alembic_config(engine), revision)


@dataclass(frozen=True)
class SchemaState:
    """Where a database's schema stands against the migrations this code ships."""

    current: str | None
    head: str
    pending: tuple[str, ...]

    @property
    def at_head(self) -> bool:
        """Return whether no migration is pending."""
        return self.current == self.head

    @property
    def ahead(self) -> bool:
        """Return whether the database carries a revision this code does not know (a newer release migrated it)."""
        return self.current is not None and not self.at_head and not self.pending


def schema_state(engine: Engine) -> SchemaState:
    """Read the database's Alembic revision and list the migrations still to run (reads only)."""
    script = ScriptDirectory.from_config(alembic_config(engine))
    head = script.get_current_head()
    if head is None:  # pragma: no cover - the package always ships migrations
        raise RuntimeError("no migrations found")
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    known = {rev.revision for rev in script.walk_revisions()}
    if current is not None and current not in known:
        return SchemaState(current, head, ())
    # walk_revisions runs head → base; what lies above ``current`` is pending, oldest first.
    pending = [rev.revision for rev in script.iterate_revisions(head, current)]
    return SchemaState(current, head, tuple(reversed(pending)))
