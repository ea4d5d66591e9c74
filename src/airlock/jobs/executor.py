"""Where a claimed job's handler runs: on the runner's own thread, or elsewhere (a Ray cluster).

The runner keeps the job's state in the database (claim, heartbeat, cancel, resume); an executor
only runs ``handler.run(ctx)`` somewhere and returns its result. An executor that loses the run
(the node or worker died) raises :class:`ExecutionLost`, and the runner re-queues the job to
resume from its checkpoint or fails it with that reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from airlock.jobs.runner import JobContext, JobHandler

__all__ = ["ExecutionLost", "InProcessExecutor", "JobExecutor"]


class ExecutionLost(Exception):
    """The place running a job went away before it finished (a node died, a worker was killed)."""


class JobExecutor(Protocol):
    """Runs a claimed job's handler and returns its result (raising what the handler raised)."""

    def execute(self, kind: str, handler: JobHandler, ctx: JobContext) -> dict[str, Any]:
        """Run ``handler`` for the job ``ctx`` describes; block until it ends."""
        ...


class InProcessExecutor:
    """Runs the handler on the calling worker thread (the embedded default)."""

    def execute(self, kind: str, handler: JobHandler, ctx: JobContext) -> dict[str, Any]:
        """Call ``handler.run(ctx)`` here."""
        return handler.run(ctx)
