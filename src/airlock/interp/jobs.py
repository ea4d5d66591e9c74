"""The interp job handler: one fresh sandboxed runner per job, the output policy, storage and ledger."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from airlock.access.models import Grant
from airlock.access.seal import verified_grant
from airlock.access.terms import terms_of
from airlock.backends.pool import BackendPool, VariantRuntimeSpec, weights_spec
from airlock.backends.protocol import ChatCompletionRequest, ChatMessage
from airlock.config import Settings
from airlock.db import Database
from airlock.errors import AirlockError
from airlock.interp import service as interp
from airlock.interp.errors import InterpJobError
from airlock.interp.leak_index import param_index
from airlock.interp.models import InterpJob
from airlock.interp.output_policy import OutputPolicy, apply_policy
from airlock.interp.pool import RunnerPool, shared_pool
from airlock.interp.run import JobSpec, RunOutcome, cpu_limit_for, run_job, runner_limits
from airlock.interp.terms import InterpTerms
from airlock.interp.tracing import ServeBudget
from airlock.interp.workers import BackendWorker, ModelWorker, model_size
from airlock.jobs.models import Job
from airlock.jobs.runner import JobCancelled, JobContext
from airlock.jobs.service import add_event
from airlock.mitigations import build_mitigation
from airlock.registry.models import Variant
from airlock.sandbox import ResourceLimits, SandboxError, find_bwrap

log = logging.getLogger(__name__)

KIND = interp.KIND
MiB = 1024 * 1024

WorkerProvider = Callable[[VariantRuntimeSpec], ModelWorker]


def variant_system_prompt(mitigations: Sequence[Mapping[str, Any]]) -> str | None:
    """Return the system prompt a variant's mitigations give a chat that has none of its own (None: no prompt).

    Each mitigation's own ``transform_chat`` runs in manifest order, as the serving pipeline runs
    them, on a chat of one user message: chat-formatted interp prompts get the system prompt the
    variant's users get (``prepend`` and ``replace`` included). Filters act on text, not on
    activations, and change nothing here.
    """
    request = ChatCompletionRequest(model="interp", messages=[ChatMessage(role="user", content="")])
    for spec in mitigations:
        request = build_mitigation(spec["name"], spec["kind"], spec.get("config")).transform_chat(request)
    first = request.messages[0]
    return first.text() if first.role == "system" else None


def pool_workers(pool: BackendPool, loop: asyncio.AbstractEventLoop) -> WorkerProvider:
    """Return a provider of model workers over the gateway's backends (called from job threads)."""

    def provide(spec: VariantRuntimeSpec) -> ModelWorker:
        from airlock.backends.local import LocalBackend  # torch only when a job runs on local weights

        # The pool belongs to the gateway's event loop; job threads borrow it from there.
        backend = asyncio.run_coroutine_threadsafe(pool.backend(spec), loop).result()
        if not isinstance(backend, LocalBackend):
            raise InterpJobError(
                f"variant {spec.variant_id} is not served from local weights", code="backend_not_supported"
            )
        return BackendWorker(backend)

    return provide


def backend_workers(backend: Any) -> WorkerProvider:
    """Return a provider of model workers over one started local backend (a Ray model worker's own)."""

    def provide(spec: VariantRuntimeSpec) -> ModelWorker:
        return BackendWorker(backend)

    return provide


def warm_runners(settings: Settings) -> RunnerPool | None:
    """Return this process's pool of warm sandboxed runners as configured (None: each job starts its own)."""
    return shared_pool(settings.interp_warm_runners, settings.interp_warm_idle_s)


class InterpHandler:
    """Runs one interp job: sandboxed runner ↔ host RPC, then output policy, storage, audit and ledger.

    A job has no partial state worth keeping, so after a restart it simply runs again from the
    start (``resumable`` with no checkpoint).
    """

    resumable = True

    def __init__(
        self, db: Database, settings: Settings, workers: WorkerProvider, runners: RunnerPool | None = None
    ) -> None:
        self.db = db
        self.settings = settings
        self.workers = workers
        self.runners = runners
        """Warm sandboxed runners (each taken by one job, never reused); None: every job starts its own."""

    def default_limits(self) -> ResourceLimits:
        """Return the sandbox limits of a job that asks for none and runs on a grant without a CPU quota."""
        return runner_limits(
            cpu_seconds=self.settings.interp_cpu_seconds,
            wall_seconds=self.settings.interp_wall_timeout_s,
            memory_bytes=self.settings.interp_memory_mb * MiB,
            log_bytes=self.settings.interp_log_bytes,
        )

    def prime(self) -> threading.Thread | None:
        """Start warm runners for the default limits in the background, so the first job finds one waiting.

        Returns the starting thread (None when this handler keeps no warm runners or no sandbox
        is installed: jobs then start their own runner, and say why if they cannot).
        """
        runners = self.runners
        if runners is None:
            return None
        try:
            find_bwrap()
        except SandboxError as exc:
            log.warning("interp: no warm runners started: %s", exc)
            return None
        limits = self.default_limits()

        def start() -> None:
            try:
                runners.prime(limits)
            except Exception:  # a failed start only costs the first job its warm runner
                log.warning("interp: starting warm runners failed", exc_info=True)

        thread = threading.Thread(target=start, name="airlock-interp-prime", daemon=True)
        thread.start()
        return thread

    def on_finished(self, session: Session, job: Job) -> None:
        """Seal or drop the job's code and arguments, and a failed job's logs, unless its grant keeps content."""
        row = session.get(InterpJob, job.id)
        if row is not None:
            interp.forget_code(session, job, row, self.settings.artifacts_dir)
            interp.forget_failure(session, self.settings.artifacts_dir, job, row)

    def run(self, ctx: JobContext) -> dict[str, Any]:
        """Run the job and return its summary (the result itself is stored under the data dir)."""
        picked_up = time.monotonic()  # usage["runner_ready_ms"] counts from here: pickup to a ready sandbox
        params = ctx.params
        with self.db.session() as session:
            row = session.get(InterpJob, ctx.job_id)
            variant = session.get(Variant, params["variant_id"])
            if row is None or variant is None:
                raise InterpJobError("the job's record or its variant no longer exists", code="not_found")
            grant_id = row.grant_id
            system_prompt = variant_system_prompt(
                [{"name": m.name, "kind": m.kind, "config": dict(m.config)} for m in variant.mitigations]
            )
            spec = VariantRuntimeSpec(
                variant_id=variant.id,
                backend=variant.backend,
                backend_config=dict(variant.backend_config),
                mitigations=[],
            )
            # The job runs on the grant's terms as they are now: a row edited since submission is refused.
            grant = verified_grant(session, grant_id, alert_db=self.db, where=f"interp job {ctx.job_id}")
            cpu_used, bytes_released = interp.usage_of_grant(session, grant_id)
            cpu_quota = terms_of(grant, InterpTerms).quota_interp_cpu_seconds
            bytes_quota = interp.grant_result_bytes(grant, self.settings)
        # A vLLM-served variant is studied on a model worker holding the same weights in transformers.
        local = weights_spec(spec)
        if local is None:
            raise InterpJobError(
                f"variant {params['model']} is served by a {spec.backend!r} backend without lab-side weights; "
                "interp jobs need weights a model worker can load",
                code="backend_not_supported",
            )
        limits = params["limits"]
        cpu_left = None if cpu_quota is None else cpu_quota - cpu_used
        if cpu_left is not None and cpu_left <= 0:
            raise InterpJobError("the grant's interp CPU quota is used up", code="insufficient_quota")
        sandbox_limits = runner_limits(
            cpu_seconds=cpu_limit_for(cpu_left, int(limits["cpu_seconds"])),
            wall_seconds=float(limits["wall_seconds"]),
            memory_bytes=int(limits["memory_mb"]) * MiB,
            log_bytes=self.settings.interp_log_bytes,
        )
        ctx.emit("loading the model on the host", model=params["model"])
        worker = self.workers(local)
        serve, review_bytes = self._serve_budget(grant_id, worker, sandbox_limits)
        ctx.progress(0.1)
        ctx.emit(
            "starting a sandboxed runner",
            cpu_seconds=sandbox_limits.cpu_seconds,
            wall_seconds=sandbox_limits.wall_timeout_s,
            memory_mb=limits["memory_mb"],
            served_bytes_left=serve.served_left,
            full_logits=serve.full_logits,
        )
        job_spec = JobSpec(
            code=str(params["code"]),
            filename=str(params["filename"]),
            entry_point=str(params["entry_point"]),
            args=dict(params.get("args") or {}),
            system_prompt=system_prompt,
        )
        outcome = asyncio.run(
            run_job(
                job_spec,
                worker,
                sandbox_limits,
                cancelled=ctx.cancelled,
                max_result_bytes=self.settings.interp_max_result_bytes,
                max_patch_ratio=self.settings.interp_max_patch_norm_ratio,
                serve=serve,
                pool=self.runners,
                since=picked_up,
            )
        )
        cpu = float(outcome.usage.get("cpu_seconds", 0.0)) + float(outcome.usage["rpc"]["model_seconds"])
        outcome.usage["served_bytes"] = serve.served
        over, grant_served = self._record_run(ctx.job_id, grant_id, outcome, cpu, serve.served, review_bytes)
        if ctx.cancelled() and outcome.value is None and outcome.error is None:
            self._ledger(ctx.job_id, "cancelled")
            raise JobCancelled()
        ctx.progress(0.9)
        try:
            if outcome.error is not None and over:
                # What the code raised is the evaluator's text: past the threshold it stays with the lab
                # (in the logs reviewers see), like the logs; the error code still says what happened.
                raise InterpJobError(
                    f"the job failed ({outcome.error.code}); details are withheld because the grant is past its "
                    "interp serving review threshold (the lab's reviewers see them)",
                    code=outcome.error.code,
                )
            if outcome.error is not None:
                raise outcome.error
            policy = OutputPolicy(
                max_result_bytes=self.settings.interp_max_result_bytes,
                grant_bytes_left=None if bytes_quota is None else bytes_quota - bytes_released,
                review_over_bytes=self.settings.interp_review_over_bytes,
            )
            released = apply_policy(outcome.value, policy, param_index(worker))
        except AirlockError:
            self._ledger(ctx.job_id, "failed")
            raise
        if over:
            released.needs_review = True
            released.review_reasons.append(
                f"the grant's interp jobs have been served {grant_served} bytes of activations, logits and text, "
                f"past its review threshold of {review_bytes} bytes"
            )
        interp.write_result(self.settings.artifacts_dir, ctx.job_id, released.document, released.npz)
        digest = released.sha256
        with self.db.session() as session:
            row = session.get(InterpJob, ctx.job_id)
            assert row is not None
            row.result_bytes = released.result_bytes
            row.result_sha256 = digest
            row.result_arrays = released.arrays
            row.review_state = "pending" if released.needs_review else "none"
            row.review_reasons = released.review_reasons
        if released.needs_review:
            ctx.emit("result held for review by the lab", reasons=released.review_reasons)
        ctx.emit("result stored", result_bytes=released.result_bytes, result_sha256=digest)
        self._ledger(ctx.job_id, "succeeded")
        return {
            "result_bytes": released.result_bytes,
            "result_sha256": digest,
            "review": "pending" if released.needs_review else "none",
            "cpu_seconds": round(cpu, 3),
        }

    def _serve_budget(self, grant_id: str, worker: ModelWorker, limits: ResourceLimits) -> tuple[ServeBudget, int]:
        """Return what the host may serve this job (and the grant's review threshold), from the grant's terms."""
        size = model_size(worker)
        with self.db.session() as session:
            grant = verified_grant(session, grant_id, alert_db=self.db, where=f"interp job of grant {grant_id}")
            served = interp.served_limits(grant, self.settings, size.parameter_bytes, size.embedding_parameters)
            before = interp.served_by_grant(session, grant_id)
            full_logits = terms_of(grant, InterpTerms).interp_full_logits
        if before >= served.budget_bytes:
            raise InterpJobError(
                f"the grant's interp serving budget of {served.budget_bytes} bytes is used up ({before} served)",
                code="insufficient_quota",
            )
        memory = limits.memory_bytes or self.settings.interp_memory_mb * MiB
        serve = ServeBudget(
            full_logits=full_logits,
            # A reply must fit in the runner with room to decode and use it.
            max_reply_bytes=min(self.settings.interp_max_reply_bytes, memory // 4),
            max_host_bytes=self.settings.interp_host_memory_mb * MiB,
            served_left=served.budget_bytes - before,
            served_budget=served.budget_bytes,
        )
        return serve, served.review_bytes

    def _record_run(
        self, job_id: str, grant_id: str, outcome: RunOutcome, cpu: float, served: int, review_bytes: int
    ) -> tuple[bool, int]:
        """Store the run's usage and logs; return whether the grant is now past its review threshold, and its total."""
        with self.db.session() as session:
            row = session.get(InterpJob, job_id)
            assert row is not None
            row.usage = outcome.usage
            # A job re-run after a restart is charged for every attempt.
            row.cpu_seconds = float(row.cpu_seconds or 0.0) + cpu
            row.served_bytes = int(row.served_bytes or 0) + served
            session.flush()
            # Jobs of one grant finishing at once are decided one after the other (PostgreSQL row
            # lock; SQLite serialises writers), so released results never sum past the threshold.
            session.execute(select(Grant.id).where(Grant.id == grant_id).with_for_update())
            total = interp.served_by_grant(session, grant_id)
            # A job that was served nothing carries nothing of the model out.
            over = served > 0 and total > review_bytes
            row.logs_withheld = over
            logs = outcome.logs
            if over and outcome.error is not None:
                logs += f"\n[airlock] job error ({outcome.error.code}): {outcome.error.message}"
            row.logs = logs
            add_event(session, job_id, "runner finished", type="message", **_flat_usage(outcome.usage))
        return over, total

    def _ledger(self, job_id: str, status: str) -> None:
        try:
            with self.db.session() as session:
                job = session.get(Job, job_id)
                row = session.get(InterpJob, job_id)
                if job is not None and row is not None:
                    interp.record_ledger(session, job, row, event="finished", status=status)
        except Exception:  # the job's outcome must be stored even if the ledger is down
            log.exception("interp job %s: could not record the ledger event", job_id)


def _flat_usage(usage: dict[str, Any]) -> dict[str, Any]:
    rpc = usage.get("rpc") or {}
    return {
        "cpu_seconds": usage.get("cpu_seconds"),
        "wall_seconds": usage.get("wall_seconds"),
        "max_rss_kib": usage.get("max_rss_kib"),
        "termination": usage.get("termination"),
        "rpc_calls": sum((rpc.get("calls") or {}).values()),
        "rpc_bytes_out": rpc.get("bytes_out"),
        "served_bytes": usage.get("served_bytes"),
        "model_seconds": rpc.get("model_seconds"),
    }
