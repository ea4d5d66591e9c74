"""SQLAlchemy 2.0 engine and sessions; schema managed by Alembic migrations in ``migrations/``."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import JSON, DateTime, Engine, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from airlock.signals import Signals


def utcnow() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """Return a random prefixed id such as ``grant_3f9c...`` (16 hex chars of randomness)."""
    return f"{prefix}_{secrets.token_hex(8)}"


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime column on every database (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        """Normalise to UTC before storing."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not accepted; use airlock.db.utcnow()")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        """Return an aware UTC datetime."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of every Airlock table."""

    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[str]: JSON()}


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets the gateway read while the audit writer commits; NORMAL sync is durable in WAL mode
    # across application crashes (only an OS crash can drop the last transactions).
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    # Content a grant's retention terms say to drop (interp code, logs) is zeroed in the file, not
    # left on a free page; the WAL keeps the old frame until the next checkpoint truncates it.
    cur.execute("PRAGMA secure_delete=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    """Create an engine for ``url`` with Airlock's per-dialect settings."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    # pre-ping survives a database restart; the request path reads no database on a warm
    # authentication cache, so the round trip it adds is paid off the hot path.
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


class Database:
    """An engine plus a session factory; one per process (or per test)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.signals = Signals(url, self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Yield a session that commits on success and rolls back on any error."""
        with self.sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def migrate(self) -> None:
        """Bring the schema to the latest Alembic revision."""
        # Alembic loads only when a process migrates, not with every database handle.
        from airlock.migrations import upgrade

        upgrade(self.engine)

    def require_migrated(self) -> None:
        """Refuse (``ConfigError``) a schema that ``airlock migrate`` has not brought to this code's head.

        Processes that serve or work never migrate on their own: replicas starting together would race.
        """
        from airlock.errors import ConfigError
        from airlock.migrations import schema_state

        state = schema_state(self.engine)
        if state.at_head:
            return
        where = self.engine.url.render_as_string(hide_password=True)
        if state.ahead:
            raise ConfigError(
                f"the database {where} is at schema revision {state.current}, which this Airlock release does not "
                f"know (its newest is {state.head}): upgrade Airlock, do not run an older release against it"
            )
        raise ConfigError(
            f"the database {where} is at schema revision {state.current or 'none (empty)'} but this release needs "
            f"{state.head} ({len(state.pending)} migration(s) pending): run `airlock migrate` first",
            code="schema_not_migrated",
        )

    def dispose(self) -> None:
        """Stop listening for signals and close every pooled connection."""
        self.signals.close()
        self.engine.dispose()
