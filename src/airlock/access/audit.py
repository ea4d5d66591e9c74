"""The audit trail: every request, allowed or denied, becomes one row, written in batches.

Events are queued by the request path and committed by one background thread in group commits
(DESIGN.md: ~6k rows/s committing singly vs >200k/s in batches of 100 on SQLite), so auditing
costs the request microseconds. The queue is flushed at most ``flush_interval`` after an event
arrives and on shutdown; ``flush()`` blocks until everything queued so far is durable.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, func, insert, select, text, update
from sqlalchemy.orm import Session

from airlock.access.models import AuditEvent, Grant
from airlock.db import Database, utcnow
from airlock.ledger.service import DigestedTable

log = logging.getLogger(__name__)


@dataclass
class AuditRecord:
    """One audit event before it is written."""

    request_id: str
    method: str
    path: str
    status_code: int
    outcome: str
    actor_type: str = "anonymous"
    actor: str | None = None
    evaluator_id: str | None = None
    grant_id: str | None = None
    key_id: str | None = None
    model: str | None = None
    version_id: str | None = None
    variant: str | None = None
    scope: str | None = None
    error_code: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    latency_ms: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)
    ts: datetime = field(default_factory=utcnow)


_STOP = object()
_RECORD_FIELDS = tuple(f.name for f in fields(AuditRecord))


class AuditWriter:
    """Background, batching writer of audit events.

    The request path only appends to a deque; the writer thread is woken once per batch (not per
    event), then waits ``flush_interval`` for the batch to gather unless someone is flushing.
    """

    def __init__(self, db: Database, *, flush_interval: float = 0.05, batch_size: int = 200) -> None:
        self._db = db
        self._interval = flush_interval
        self._batch = batch_size
        self._items: deque[Any] = deque()
        self._wake = threading.Event()
        self._urgent = threading.Event()
        self._thread = threading.Thread(target=self._run, name="airlock-audit", daemon=True)
        self._started = False
        self._lock = threading.Lock()
        self._open = 0
        self._idle = threading.Condition(self._lock)
        self._idle_waiters = 0
        self.written = 0
        # Called with each record as it is queued (metrics); an observer must be quick and never raise.
        self.observers: list[Callable[[AuditRecord], None]] = []

    def start(self) -> None:
        """Start the writer thread (idempotent)."""
        with self._lock:
            if not self._started:
                self._thread.start()
                self._started = True

    def begin(self) -> None:
        """Note that a request has started; its event will come through ``record(..., end=True)``."""
        with self._lock:
            self._open += 1

    def record(self, event: AuditRecord, *, end: bool = False) -> None:
        """Queue an event; never blocks on the database. ``end`` closes a ``begin()``."""
        if not self._started:
            self.start()
        self._items.append(event)
        if not self._wake.is_set():
            self._wake.set()
        for observe in self.observers:
            try:
                observe(event)
            except Exception:  # an observer's bug must not lose the audit event or fail the request
                log.exception("audit observer failed")
        if end:
            with self._lock:
                self._open -= 1
                if self._idle_waiters and self._open <= 0:
                    self._idle.notify_all()

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until every begun request has recorded its event, then flush (tests, shutdown)."""
        with self._idle:
            self._idle_waiters += 1
            try:
                self._idle.wait_for(lambda: self._open <= 0, timeout)
            finally:
                self._idle_waiters -= 1
        self.flush(timeout)

    def flush(self, timeout: float = 10.0) -> None:
        """Block until every event queued before this call has been committed."""
        if not self._started:
            return
        done = threading.Event()
        self._items.append(done)
        self._urgent.set()
        self._wake.set()
        if not done.wait(timeout):
            log.error("audit flush timed out after %.1fs", timeout)

    def queued(self) -> int:
        """Return how many events wait to be written (approximate, for metrics)."""
        return len(self._items)

    def close(self) -> None:
        """Write everything still queued and stop the thread."""
        if not self._started:
            return
        self._items.append(_STOP)
        self._urgent.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            # Let a batch gather, unless a flush or the shutdown is waiting for it.
            if not self._urgent.is_set():
                self._urgent.wait(self._interval)
            self._urgent.clear()
            if self._drain():
                return

    def _drain(self) -> bool:
        """Write everything queued now, in batches; release flush waiters after; return whether to stop."""
        batch: list[AuditRecord] = []
        waiters: list[threading.Event] = []
        stop = False
        # Only what is queued now: under constant load the deque never empties, and flush waiters must not starve.
        for _ in range(len(self._items)):
            item = self._items.popleft()
            if item is _STOP:
                stop = True
            elif isinstance(item, threading.Event):
                waiters.append(item)
            else:
                batch.append(item)
                if len(batch) >= self._batch:
                    self._write(batch)
                    batch = []
        if batch:
            self._write(batch)
        for waiter in waiters:
            waiter.set()
        return stop

    def _write(self, batch: list[AuditRecord]) -> None:
        # A shallow copy per record: the request is over, so nothing changes its detail any more
        # (``asdict`` deep-copies every value, which cost more than the insert itself).
        names = _RECORD_FIELDS
        rows = [{name: getattr(e, name) for name in names} for e in batch]
        # Token usage is charged to grants in the same transaction as the audit rows, so the
        # quota counters and the audit trail can never disagree after a crash.
        usage: dict[str, int] = {}
        for e in batch:
            if e.grant_id and (e.tokens_in or e.tokens_out):
                usage[e.grant_id] = usage.get(e.grant_id, 0) + e.tokens_in + e.tokens_out
        for attempt in range(5):
            try:
                with self._db.session() as session:
                    insert_audit_rows(session, rows)
                    for grant_id, tokens in sorted(usage.items()):
                        session.execute(
                            update(Grant).where(Grant.id == grant_id).values(tokens_used=Grant.tokens_used + tokens)
                        )
                self.written += len(rows)
                return
            except Exception:  # the writer must survive a transient DB error (locked, restarted)
                log.exception("writing %d audit events failed (attempt %d)", len(rows), attempt + 1)
                threading.Event().wait(0.2 * (attempt + 1))
        log.critical("dropping %d audit events after repeated failures", len(rows))


AUDIT_INSERT_LOCK = 0x6169726C6F636B  # "airlock": the advisory lock that orders audit inserts on PostgreSQL


def insert_audit_rows(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert audit rows so that their ids commit in order, across every writer of every replica.

    On PostgreSQL two replicas' batches draw ids from one sequence but may commit in either order;
    a digest taken between the two would cover the later ids and skip, forever, the earlier ones
    committed after it. A transaction-scoped advisory lock taken before the ids are drawn makes
    the batch that draws ids first also commit first. SQLite has a single writer already.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": AUDIT_INSERT_LOCK})
        if rows and all(row.keys() == rows[0].keys() for row in rows):
            _copy_rows(session, rows)
            return
    # The table, not the mapped class: a plain executemany, without the ORM's bulk-insert bookkeeping.
    session.execute(insert(_AUDIT_TABLE), rows)


_AUDIT_TABLE = cast(Table, AuditEvent.__table__)


def _copy_rows(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert rows on PostgreSQL with one ``COPY``: one message for the batch, not one per row.

    Each value goes through its column type's bind processing, as an INSERT would send it (UTC
    timestamps, JSON text); columns the rows leave out get their defaults, as an INSERT's would.
    """
    connection = session.connection()
    dialect = connection.dialect
    names = list(rows[0])
    columns = [_AUDIT_TABLE.c[name] for name in names]
    missing = [c for c in _AUDIT_TABLE.columns if c.name not in rows[0] and not c.primary_key]
    for column in missing:  # Python-side defaults, as SQLAlchemy applies them to an INSERT
        names.append(column.name)
        columns.append(column)
    processors = [column.type._cached_bind_processor(dialect) for column in columns]
    defaults = [_default_of(column) for column in columns[len(rows[0]) :]]
    driver = connection.connection.driver_connection
    assert driver is not None
    with driver.cursor() as cursor, cursor.copy(f"COPY {_AUDIT_TABLE.name} ({', '.join(names)}) FROM STDIN") as copy:
        for row in rows:
            values = list(row.values()) + [default() for default in defaults]
            copy.write_row(
                [
                    value if process is None else process(value)
                    for value, process in zip(values, processors, strict=True)
                ]
            )


def _default_of(column: Any) -> Callable[[], Any]:
    """Return a column's Python-side default as a function of nothing (None when it has none)."""
    default = column.default
    if default is None:
        return lambda: None
    if default.is_callable:
        return lambda: default.arg(None)
    return lambda: default.arg


def tail(session: Session, limit: int = 20, *, grant_id: str | None = None) -> list[AuditEvent]:
    """Return the newest ``limit`` audit events, oldest first."""
    stmt = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if grant_id:
        stmt = stmt.where(AuditEvent.grant_id == grant_id)
    return list(reversed(list(session.scalars(stmt))))


def summary(session: Session, *, since_id: int = 0) -> list[dict[str, Any]]:
    """Return counts and token totals grouped by evaluator, variant and outcome."""
    stmt = (
        select(
            AuditEvent.actor,
            AuditEvent.variant,
            AuditEvent.outcome,
            AuditEvent.status_code,
            func.count(),
            func.coalesce(func.sum(AuditEvent.tokens_in), 0),
            func.coalesce(func.sum(AuditEvent.tokens_out), 0),
        )
        .where(AuditEvent.id > since_id)
        .group_by(AuditEvent.actor, AuditEvent.variant, AuditEvent.outcome, AuditEvent.status_code)
        .order_by(AuditEvent.actor, AuditEvent.variant, AuditEvent.status_code)
    )
    keys = ("actor", "variant", "outcome", "status_code", "requests", "tokens_in", "tokens_out")
    return [dict(zip(keys, row, strict=True)) for row in session.execute(stmt)]


AUDIT_COLUMNS: tuple[str, ...] = (
    "id",
    "ts",
    "request_id",
    "actor_type",
    "actor",
    "evaluator_id",
    "grant_id",
    "key_id",
    "method",
    "path",
    "model",
    "version_id",
    "variant",
    "scope",
    "status_code",
    "outcome",
    "error_code",
    "tokens_in",
    "tokens_out",
    "latency_ms",
    "detail",
)
"""The audit columns the ledger's digests cover (each digest records its list, so old ones stay checkable)."""
AUDIT_DIGEST = DigestedTable(cast(Table, AuditEvent.__table__), AUDIT_COLUMNS)
"""The audit trail as the ledger digests it (``audit.digest`` events make the trail tamper-evident)."""
