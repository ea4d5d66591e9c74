"""Jobs on Ray: the runner keeps each job's state in the database; Ray runs the handler on a node with the weights.

Fine-tuning runs as a Ray task asking for the base weights' resource (and GPUs); interpretability
runs inside the model worker actor of the variant's weights, so its sandbox talks to that worker
on the same node. Either way the remote side reports through a :class:`~airlock.jobs.runner.JobContext`
on the shared database, fenced by the claim. A run whose node or worker dies ends here as
:class:`~airlock.jobs.executor.ExecutionLost`: the runner re-queues it to resume from its last
checkpoint (the artifact store holds it) or fails it with that reason.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from airlock.cluster.placement import Placement, connect
from airlock.cluster.worker import model_worker
from airlock.config import Settings
from airlock.db import Database
from airlock.errors import AirlockError
from airlock.jobs.executor import ExecutionLost
from airlock.jobs.runner import JobCancelled, JobContext, JobHandler

__all__ = ["HandlerFactory", "RayExecutor", "Route", "run_job_here"]

log = logging.getLogger(__name__)

HandlerFactory = Callable[[str, Settings, Database, Any], JobHandler]
"""Builds a job kind's handler on the node running it: ``factory(kind, settings, db, backend_or_None)``.

It must be a module-level function (Ray ships it by reference; every node has Airlock installed).
"""

_databases: dict[str, Database] = {}
_databases_lock = threading.Lock()


@dataclass(frozen=True)
class Route:
    """Where a job runs: a Ray task with ``placement``, or inside the model worker of ``worker_config``."""

    placement: Placement | None = None
    worker_config: dict[str, Any] | None = None


def _database(url: str) -> Database:
    """Return this worker process's engine on the shared database (one per URL)."""
    with _databases_lock:
        db = _databases.get(url)
        if db is None:
            db = _databases[url] = Database(url)
        return db


def run_job_here(
    factory: HandlerFactory,
    settings: Settings,
    kind: str,
    job_id: str,
    params: dict[str, Any],
    checkpoint: dict[str, Any] | None,
    runner_id: str,
    attempt: int,
    *,
    backend: Any = None,
) -> dict[str, Any]:
    """Run one job on this Ray node: build its handler, report through the shared database, return its result."""
    import ray

    db = _database(settings.db_url)
    handler = factory(kind, settings, db, backend)
    ctx = JobContext(db, job_id, params, checkpoint, runner_id=runner_id, attempt=attempt)
    node = ray.get_runtime_context().get_node_id()
    ctx.emit(f"running on Ray node {node[:12]} ({socket.gethostname()})", ray_node_id=node)
    return handler.run(ctx)


class RayExecutor:
    """A :class:`~airlock.jobs.executor.JobExecutor` that hands each job to the Ray cluster."""

    def __init__(
        self, settings: Settings, route: Callable[[str, dict[str, Any]], Route], factory: HandlerFactory
    ) -> None:
        self.settings = settings
        self.route = route
        self.factory = factory
        self._task: Any = None
        #: How long a job waits for its restarting model worker before the attempt counts as lost.
        self.restart_wait_s = 120.0

    def _submit(self, kind: str, ctx: JobContext) -> tuple[Any, bool]:
        import ray

        connect(self.settings)
        route = self.route(kind, ctx.params)
        args = (self.factory, self.settings, kind, ctx.job_id, ctx.params, ctx.checkpoint, ctx.runner_id, ctx.attempt)
        if route.worker_config is not None:
            handle = model_worker(route.worker_config)
            self._wait_alive(handle, ctx)
            return handle.run_job.remote(run_job_here, *args), False
        assert route.placement is not None
        if self._task is None:
            self._task = ray.remote(run_job_here)
        # No retries by Ray: the database decides whether the job resumes (attempts, checkpoint).
        return self._task.options(max_retries=0, **route.placement.options()).remote(*args), True

    def _wait_alive(self, handle: Any, ctx: JobContext) -> None:
        """Wait while Ray restarts the model worker (after its node died), so a restart costs no attempt."""
        import ray
        import ray.exceptions

        deadline = time.monotonic() + self.restart_wait_s
        while True:
            try:
                ray.get(handle.ping.remote(), timeout=self.restart_wait_s)
                return
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                if ctx.runner_stopping():
                    raise JobCancelled() from None
                if time.monotonic() > deadline:
                    raise ExecutionLost("its model worker did not come back") from None
                time.sleep(0.2)

    def execute(self, kind: str, handler: JobHandler, ctx: JobContext) -> dict[str, Any]:
        """Run the job on the cluster and wait for it, watching for the runner's shutdown meanwhile."""
        import ray
        import ray.exceptions

        ref, is_task = self._submit(kind, ctx)
        while True:
            ready, _ = ray.wait([ref], timeout=0.5)
            if ready:
                break
            if ctx.runner_stopping():
                # The job is re-queued by the runner; the fenced remote run stops at its next report.
                if is_task:
                    ray.cancel(ref)
                raise JobCancelled()
        try:
            result: dict[str, Any] = ray.get(ref)
            return result
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, JobCancelled | AirlockError):
                raise cause from None
            raise RuntimeError(f"{type(cause).__name__}: {cause}") from None
        except ray.exceptions.RayError as exc:
            where = "model worker" if not is_task else "Ray worker"
            log.warning("job %s: its %s was lost: %r", ctx.job_id, where, exc)
            raise ExecutionLost(f"the {where} running it was lost ({type(exc).__name__})") from None
