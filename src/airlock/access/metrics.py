"""Prometheus metrics of the gateway: requests, latency, tokens and jobs, per grant, never content.

Every figure comes from what is already audited (one observer on the audit stream) or from the jobs
table at scrape time, so metrics cannot disagree with the audit trail about what happened. Labels
carry ids a lab already manages (grant ids, variant names, route shapes), never prompts, completions
or a caller's free text: a path segment that looks like an id becomes ``{id}`` and a path no route
matched is one label, so an evaluator cannot grow the series count by probing URLs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from airlock.access.audit import AuditRecord
from airlock.db import Database
from airlock.jobs.models import JOB_STATUSES, Job

__all__ = ["CONTENT_TYPE", "GatewayMetrics", "endpoint_label"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Segments that name one object: prefixed random ids (grant_3f9c…, ft:…), numbers, hashes.
_ID_SEGMENT = re.compile(r"^(?:[a-z]+_[0-9a-f]{8,}|ft:.*|\d+|[0-9a-f]{16,}|[A-Za-z0-9_-]{32,})$")
# Paths carry ids, so the cache of label children is bounded (refilled from the registry when cleared).
_MAX_CACHED_CHILDREN = 4096
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def endpoint_label(path: str, status_code: int) -> str:
    """Return a bounded label for ``path``: ids become ``{id}``, unmatched paths one ``unmatched`` label."""
    if status_code == 404 and not path.startswith("/v1/"):
        return "unmatched"
    parts = [("{id}" if _ID_SEGMENT.match(part) else part) for part in path.split("/")]
    label = "/".join(parts[:8])
    return label if len(label) <= 96 else label[:96]


class _JobsCollector(Collector):
    """Counts jobs by kind and state from the database at each scrape (the source of truth across workers)."""

    def __init__(self, db: Database, queue_depths: Callable[[], dict[str, int]]) -> None:
        self._db = db
        self._queue_depths = queue_depths

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield job counts per (kind, status), queued jobs per kind and in-process queue depths."""
        jobs = GaugeMetricFamily("airlock_jobs", "Jobs by kind and state.", labels=["kind", "status"])
        queued = GaugeMetricFamily("airlock_job_queue_depth", "Jobs waiting for a worker.", labels=["kind"])
        try:
            with self._db.session() as session:
                rows = session.execute(select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status))
                counts = {(str(kind), str(status)): int(n) for kind, status, n in rows}
        except Exception:  # a scrape must not fail because the database blinked; the gap shows in Prometheus
            log.exception("reading job counts for /metrics failed")
            counts = {}
        kinds = sorted({kind for kind, _ in counts})
        for kind in kinds:
            for status in JOB_STATUSES:
                jobs.add_metric([kind, status], counts.get((kind, status), 0))
            queued.add_metric([kind], counts.get((kind, "queued"), 0))
        yield jobs
        yield queued
        internal = GaugeMetricFamily("airlock_queue_depth", "Items waiting in in-process queues.", labels=["queue"])
        for name, depth in sorted(self._queue_depths().items()):
            internal.add_metric([name], depth)
        yield internal


class GatewayMetrics:
    """One process's metrics registry; ``observe`` is fed every audit record."""

    def __init__(self, db: Database, queue_depths: Callable[[], dict[str, int]] | None = None) -> None:
        # A registry per app, not the global one: tests build many apps in one process.
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "airlock_requests",
            "Requests by endpoint shape, method, status, outcome and grant.",
            ["endpoint", "method", "status", "outcome", "grant"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "airlock_request_latency_seconds",
            "Request latency by endpoint shape.",
            ["endpoint", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "airlock_tokens",
            "Tokens processed per grant, variant and direction (prompt = in, completion = out).",
            ["grant", "model", "variant", "direction"],
            registry=self.registry,
        )
        self.registry.register(_JobsCollector(db, queue_depths or dict))
        # Each request would otherwise look its label children up by name twice: keep them by their labels.
        self._children: dict[tuple[str, str, int, str, str], tuple[Any, Any]] = {}
        self._token_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def observe(self, record: AuditRecord) -> None:
        """Count one audited request (ids and sizes only; the record's detail is never read)."""
        grant = record.grant_id or "-"
        key = (record.path, record.method, record.status_code, record.outcome, grant)
        children = self._children.get(key)
        if children is None:
            endpoint = endpoint_label(record.path, record.status_code)
            children = (
                self.requests.labels(endpoint, record.method, str(record.status_code), record.outcome, grant),
                self.latency.labels(endpoint, record.method),
            )
            if len(self._children) >= _MAX_CACHED_CHILDREN:
                self._children.clear()
            self._children[key] = children
        children[0].inc()
        children[1].observe(max(record.latency_ms, 0.0) / 1000.0)
        if record.tokens_in or record.tokens_out:
            token_key = (grant, record.model or "-", record.variant or "-")
            counters = self._token_children.get(token_key)
            if counters is None:
                counters = (self.tokens.labels(*token_key, "in"), self.tokens.labels(*token_key, "out"))
                if len(self._token_children) >= _MAX_CACHED_CHILDREN:
                    self._token_children.clear()
                self._token_children[token_key] = counters
            if record.tokens_in:
                counters[0].inc(record.tokens_in)
            if record.tokens_out:
                counters[1].inc(record.tokens_out)

    def render(self) -> bytes:
        """Return the registry in Prometheus' text exposition format."""
        return generate_latest(self.registry)
