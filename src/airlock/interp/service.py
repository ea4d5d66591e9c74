"""Interp job logic with no HTTP: submit (checked against the grant), look up, results, cancel, review."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from airlock.access import sealing
from airlock.access.acceptance import require_acceptance
from airlock.access.models import Grant
from airlock.access.retention import grant_keeps_content
from airlock.access.service import Principal, authorize, check_window
from airlock.access.terms import terms_of
from airlock.atomicfile import write_atomically
from airlock.backends.pool import VariantRuntimeSpec, weights_spec
from airlock.config import Settings
from airlock.db import Database, utcnow
from airlock.errors import ConflictError, InvalidRequestError, NotFoundError, RateLimitError
from airlock.ids import parse_model_id
from airlock.interp import _wire
from airlock.interp.client import RESULT_FORMAT
from airlock.interp.models import InterpJob
from airlock.interp.schemas import (
    ArraySpec,
    InterpJobCreate,
    InterpJobPublic,
    InterpResult,
    JobErrorBody,
    ReviewItem,
    ReviewView,
)
from airlock.interp.terms import InterpTerms
from airlock.jobs import service as jobs
from airlock.jobs.models import Job, JobEvent
from airlock.jobs.periodic import PeriodicWorker
from airlock.ledger import service as ledger
from airlock.registry.models import ModelVersion
from airlock.registry.service import resolve_variant

KIND = "interp"
ID_PREFIX = "ijob"
MAX_ARGS_BYTES = 64 * 1024
# Default review thresholds never exceed this share of the embedding in float32: at one served
# number per linear measurement, at most 0.5 % of its rows can be derived before review.
EMBEDDING_REVIEW_FRACTION = 0.005
WITHHELD_LOGS = (
    "(withheld: this job ran past its grant's interp serving review threshold; the lab's reviewers see its logs)"
)


# ---------------------------------------------------------------------------------- storage


def job_dir(home: Path, job_id: str) -> Path:
    """Return where a job's released result lives (``result.json`` and ``result.npz``)."""
    return home / "interp" / job_id


def write_result(home: Path, job_id: str, document: dict[str, Any], npz: bytes) -> None:
    """Store a result atomically (temporary files, then renames)."""
    directory = job_dir(home, job_id)
    for name, data in (("result.npz", npz), ("result.json", json.dumps(document).encode())):
        write_atomically(directory / name, data)


def discard_result(home: Path, job_id: str) -> None:
    """Delete a job's stored result (a denied review)."""
    shutil.rmtree(job_dir(home, job_id), ignore_errors=True)


# ---------------------------------------------------------------------------------- quotas


def usage_of_grant(session: Session, grant_id: str) -> tuple[float, int]:
    """Return the grant's interp CPU seconds used and result bytes released (denied results excluded)."""
    cpu = session.scalar(
        select(func.coalesce(func.sum(InterpJob.cpu_seconds), 0.0)).where(InterpJob.grant_id == grant_id)
    )
    released = session.scalar(
        select(func.coalesce(func.sum(InterpJob.result_bytes), 0)).where(
            InterpJob.grant_id == grant_id, InterpJob.review_state != "denied"
        )
    )
    return float(cpu or 0.0), int(released or 0)


def served_by_grant(session: Session, grant_id: str) -> int:
    """Return the bytes of activations, logits and text the grant's interp jobs have been served, all jobs."""
    served = session.scalar(
        select(func.coalesce(func.sum(InterpJob.served_bytes), 0)).where(InterpJob.grant_id == grant_id)
    )
    return int(served or 0)


@dataclass(frozen=True)
class ServedLimits:
    """A grant's budget on what its interp jobs are served, and the review threshold inside it."""

    review_bytes: int
    """Past this many bytes served to the grant, its jobs' results (and logs) wait for review."""
    budget_bytes: int
    """Past this, the host refuses to serve more."""


def served_limits(
    grant: Grant | None, settings: Settings, parameter_bytes: int, embedding_parameters: int
) -> ServedLimits:
    """Return a grant's serving limits: its own terms, else defaults relative to the model's size.

    Default review threshold: ``interp_served_review_fraction`` of the parameter bytes, and never
    more than :data:`EMBEDDING_REVIEW_FRACTION` of the embedding in float32 (each served number is
    one linear measurement, so at most that share of the embedding's rows can be derived before
    review, whatever the architecture). Default budget: ``interp_served_budget_fraction`` of the
    parameter bytes (at least the threshold).
    """
    review = min(
        int(settings.interp_served_review_fraction * parameter_bytes),
        int(EMBEDDING_REVIEW_FRACTION * embedding_parameters * 4),
    )
    budget = max(int(settings.interp_served_budget_fraction * parameter_bytes), review)
    terms = terms_of(grant, InterpTerms)
    own_budget, own_review = terms.quota_interp_served_bytes, terms.interp_review_served_bytes
    budget = int(own_budget) if own_budget is not None else budget
    review = int(own_review) if own_review is not None else min(review, budget)
    return ServedLimits(review_bytes=review, budget_bytes=budget)


def grant_result_bytes(grant: Grant | None, settings: Settings) -> int:
    """Return a grant's interp result-bytes budget: its own quota, else the lab's default."""
    quota = terms_of(grant, InterpTerms).quota_result_bytes
    return int(quota) if quota is not None else settings.interp_default_grant_result_bytes


def enforce_quotas(session: Session, principal: Principal, settings: Settings | None = None) -> None:
    """Refuse a new job (429) when the grant's interp CPU or result-bytes quota is used up."""
    grant = principal.grant
    terms = terms_of(grant, InterpTerms)
    budget = grant_result_bytes(grant, settings or Settings())
    cpu, released = usage_of_grant(session, grant.id)
    if terms.quota_interp_cpu_seconds is not None and cpu >= terms.quota_interp_cpu_seconds:
        raise RateLimitError(
            f"your grant's interp quota of {terms.quota_interp_cpu_seconds:g} CPU seconds is used up ({cpu:.1f} used)",
            code="insufficient_quota",
        )
    if released >= budget:
        which = "quota" if terms.quota_result_bytes is not None else "default budget (the grant sets no quota)"
        raise RateLimitError(
            f"your grant's {which} of {budget} result bytes is used up ({released} released)",
            code="insufficient_quota",
        )
    # The default serving budget depends on the model's size, known where the job runs; an explicit
    # quota is checked here too, so a spent grant gets a 429 rather than a job that is refused.
    served_quota = terms.quota_interp_served_bytes
    if served_quota is not None:
        served = served_by_grant(session, grant.id)
        if served >= served_quota:
            raise RateLimitError(
                f"your grant's interp serving budget of {served_quota} bytes is used up ({served} served)",
                code="insufficient_quota",
            )


# ---------------------------------------------------------------------------------- submit


def create_job(session: Session, settings: Settings, principal: Principal, body: InterpJobCreate) -> Job:
    """Queue an interp job on a granted local variant; the code is kept with the job."""
    check_window(principal.grant)
    code_bytes = len(body.code.encode())
    if code_bytes > settings.interp_max_code_bytes:
        raise InvalidRequestError(
            f"the code is {code_bytes} bytes; at most {settings.interp_max_code_bytes} are accepted",
            code="code_too_large",
            param="code",
        )
    try:
        compile(body.code, body.filename, "exec")
    except (SyntaxError, ValueError) as exc:
        raise InvalidRequestError(f"the code does not compile: {exc}", code="syntax_error", param="code") from None
    except (RecursionError, MemoryError, OverflowError):
        raise InvalidRequestError(
            "the code does not compile: it is nested too deeply for the compiler", code="syntax_error", param="code"
        ) from None
    # The job travels to the runner inside one wire message (args one level down): deeper args
    # could never be sent.
    if _wire.nesting_depth(body.args) + 1 > _wire.MAX_DEPTH:
        raise InvalidRequestError(f"args are nested deeper than {_wire.MAX_DEPTH - 1} levels", param="args")
    try:
        args_json = json.dumps(body.args, allow_nan=False)
    except ValueError:
        raise InvalidRequestError("args must be finite JSON values", param="args") from None
    if len(args_json) > MAX_ARGS_BYTES:
        raise InvalidRequestError(f"args are over {MAX_ARGS_BYTES} bytes of JSON", param="args")
    target = resolve_variant(session, parse_model_id(body.model))
    authorize(principal, target, ["interp"])
    require_acceptance(session, principal.grant, "retention_interp")
    if weights_spec(VariantRuntimeSpec.of(target)) is None:
        raise InvalidRequestError(
            f"variant {body.model!r} is served by a {target.backend!r} backend without lab-side weights; "
            "interp jobs need weights a model worker can load (local, or vLLM with `weights`)",
            code="backend_not_supported",
            param="model",
        )
    enforce_quotas(session, principal, settings)
    requested = body.limits
    limits = {
        "cpu_seconds": min(settings.interp_cpu_seconds, (requested.cpu_seconds if requested else None) or 10**9),
        "wall_seconds": min(settings.interp_wall_timeout_s, (requested.wall_seconds if requested else None) or 1e9),
        "memory_mb": min(settings.interp_memory_mb, (requested.memory_mb if requested else None) or 10**9),
    }
    version = session.get(ModelVersion, target.version_id)
    job = jobs.enqueue(
        session,
        KIND,
        evaluator_id=principal.evaluator_id,
        grant_id=principal.grant_id,
        params={},
        id_prefix=ID_PREFIX,
    )
    model = f"{target.model_name}/{target.variant_name}"
    job.params = {
        "model": model,
        "variant_id": target.variant_id,
        "code": body.code,
        "filename": body.filename,
        "entry_point": body.entry_point,
        "args": body.args,
        "limits": limits,
    }
    session.add(
        InterpJob(
            id=job.id,
            evaluator_id=principal.evaluator_id,
            grant_id=principal.grant_id,
            model=model,
            version_id=target.version_id,
            variant_id=target.variant_id,
            content_hash=version.content_hash if version is not None else "",
            filename=body.filename,
            entry_point=body.entry_point,
            code_sha256=hashlib.sha256(body.code.encode()).hexdigest(),
            code_bytes=code_bytes,
            args=body.args,
            limits=limits,
            created_at=job.created_at,
        )
    )
    session.flush()
    return job


# ---------------------------------------------------------------------------------- views


def get_own_job(session: Session, principal: Principal, job_id: str) -> tuple[Job, InterpJob]:
    """Return an interp job of the caller's grant (404 for anyone else's: existence is not revealed)."""
    job = session.get(Job, job_id)
    row = session.get(InterpJob, job_id) if job is not None else None
    if job is None or row is None or job.kind != KIND or job.grant_id != principal.grant_id:
        raise NotFoundError(f"interp job {job_id!r} does not exist", code="job_not_found")
    return job, row


def get_job_for_lab(session: Session, job_id: str) -> tuple[Job, InterpJob]:
    """Return any interp job (lab side)."""
    job = session.get(Job, job_id)
    row = session.get(InterpJob, job_id) if job is not None else None
    if job is None or row is None or job.kind != KIND:
        raise NotFoundError(f"interp job {job_id!r} does not exist", code="job_not_found")
    return job, row


def public_status(job: Job, row: InterpJob) -> str:
    """Return the status an evaluator sees (a held or denied result is not plain 'succeeded')."""
    if job.status == "succeeded" and row.review_state == "pending":
        return "awaiting_review"
    if job.status == "succeeded" and row.review_state == "denied":
        return "denied"
    return job.status


def to_public(job: Job, row: InterpJob) -> InterpJobPublic:
    """Render a job for its owner."""
    error = job.error or None
    return InterpJobPublic(
        id=job.id,
        model=row.model,
        status=public_status(job, row),  # type: ignore[arg-type]
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        filename=row.filename,
        entry_point=row.entry_point,
        code_sha256=row.code_sha256,
        limits=dict(row.limits),
        usage=dict(row.usage),
        result_bytes=row.result_bytes,
        error=JobErrorBody(code=str(error.get("code", "error")), message=str(error.get("message", "")))
        if error
        else None,
        review=ReviewView(
            state=row.review_state,  # type: ignore[arg-type]
            reasons=list(row.review_reasons),
            note=row.review_note,
            reviewed_at=row.reviewed_at,
        ),
        logs=WITHHELD_LOGS if logs_withheld(row) else row.logs,
        served_bytes=int(row.served_bytes or 0),
    )


def logs_withheld(row: InterpJob) -> bool:
    """Return whether the evaluator may not see a job's logs: a held or denied result, or past the threshold."""
    if row.review_state in ("pending", "denied"):
        return True
    return bool(row.logs_withheld) and row.review_state != "approved"


def to_review_item(job: Job, row: InterpJob) -> ReviewItem:
    """Render a job for the lab's reviewers (with code and arguments)."""
    public = to_public(job, row).model_dump()
    public["logs"] = row.logs
    return ReviewItem(
        **public,
        evaluator_id=row.evaluator_id,
        grant_id=row.grant_id,
        code=str(job.params.get("code", "")),
        args=dict(row.args),
    )


def list_own_jobs(
    session: Session, principal: Principal, *, after: str | None, limit: int
) -> tuple[list[tuple[Job, InterpJob]], bool]:
    """Return a page of the grant's interp jobs, newest first."""
    rows, has_more = jobs.list_jobs(session, principal.evaluator_id, after=after, limit=limit, kind=KIND)
    out = []
    for job in rows:
        row = session.get(InterpJob, job.id)
        if row is not None and job.grant_id == principal.grant_id:
            out.append((job, row))
    return out, has_more


def released_result(home: Path, job: Job, row: InterpJob) -> InterpResult:
    """Return a job's result once released (409 while running, held for review, denied or failed)."""
    _check_released(job, row)
    path = job_dir(home, job.id) / "result.json"
    if not path.exists():
        raise ConflictError(f"the result of job {job.id} is no longer stored", code="result_missing")
    return InterpResult(
        job_id=job.id,
        value=json.loads(path.read_text()),
        arrays=[ArraySpec(**spec) for spec in row.result_arrays],
        result_bytes=row.result_bytes,
        result_sha256=row.result_sha256 or "",
        npz_path=f"/v1/airlock/interp/jobs/{job.id}/result.npz",
    )


def released_npz(home: Path, job: Job, row: InterpJob) -> Path:
    """Return the path of a released result's arrays (NPZ)."""
    _check_released(job, row)
    path = job_dir(home, job.id) / "result.npz"
    if not path.exists():
        raise ConflictError(f"the result of job {job.id} is no longer stored", code="result_missing")
    return path


def _check_released(job: Job, row: InterpJob) -> None:
    status = public_status(job, row)
    if status == "succeeded":
        return
    if status == "awaiting_review":
        raise ConflictError(f"the result of job {job.id} is awaiting review by the lab", code="awaiting_review")
    if status == "denied":
        raise ConflictError(
            f"the lab denied the release of job {job.id}'s result: {row.review_note}", code="result_denied"
        )
    if status == "failed":
        message = (job.error or {}).get("message", "")
        raise ConflictError(f"job {job.id} failed and has no result: {message}", code="job_failed")
    raise ConflictError(f"job {job.id} is {status}; it has no result", code="job_not_finished")


# ---------------------------------------------------------------------------------- review


def list_for_review(
    session: Session, *, state: str | None = "pending", limit: int = 100
) -> list[tuple[Job, InterpJob]]:
    """Return interp jobs (held results by default), oldest first."""
    stmt = select(InterpJob)
    if state is not None:
        if state not in ("none", "pending", "approved", "denied"):
            raise InvalidRequestError(f"unknown review state {state!r}", param="state")
        stmt = stmt.where(InterpJob.review_state == state)
    out = []
    for row in session.scalars(stmt.order_by(InterpJob.created_at, InterpJob.id).limit(limit)):
        job = session.get(Job, row.id)
        if job is not None:
            out.append((job, row))
    return out


def decide(session: Session, job_id: str, *, reviewer: str, decision: str, reason: str) -> tuple[Job, InterpJob]:
    """Approve or deny a held result; a denial needs a reason (delete its files after committing)."""
    job, row = get_job_for_lab(session, job_id)
    if row.review_state != "pending" or job.status != "succeeded":
        raise ConflictError(f"job {job_id} has no result waiting for review", code="not_awaiting_review")
    if decision not in ("approve", "deny"):
        raise InvalidRequestError("decision must be 'approve' or 'deny'", param="decision")
    if decision == "deny" and not reason.strip():
        raise InvalidRequestError("a denial needs a reason (it is shown to the evaluator)", param="reason")
    row.review_state = "approved" if decision == "approve" else "denied"
    row.reviewer = reviewer
    row.review_note = reason.strip() or None
    row.reviewed_at = utcnow()
    jobs.add_event(session, job.id, f"result {row.review_state} by the lab", type="message", reviewer=reviewer)
    record_ledger(session, job, row, event="review")
    # The review was the last use of the code (reviewers read it): a grant that keeps no content drops it now.
    forget_code(session, job, row)
    session.flush()
    return job, row


# ---------------------------------------------------------------------------------- retention


def keeps_content(session: Session, row: InterpJob) -> bool:
    """Return whether the job's grant lets the lab keep its code, arguments, logs and result after use."""
    return grant_keeps_content(session, row.grant_id, "retention_interp")


def forget_code(session: Session, job: Job, row: InterpJob, home: Path | None = None) -> None:
    """Seal or drop a finished job's code and arguments unless its grant keeps content (their hash and size stay).

    A result held for review keeps its code until the lab decides: reviewers read what produced it.
    """
    if row.review_state == "pending":
        return
    plan = sealing.disposition(session, row.grant_id, "interp")
    if plan.action == "keep":
        return
    params = job.params or {}
    if "code" in params or row.args:
        for kind, name, data in (
            ("interp_code", "code.py", str(params.get("code", "")).encode()),
            ("interp_args", "args.json", json.dumps(row.args, sort_keys=True).encode()),
        ):
            _seal_or_note(session, plan, job, kind=kind, name=name, data=data, home=home)
    job.params = {k: v for k, v in params.items() if k not in ("code", "args")}
    row.args = {}


def forget_failure(session: Session, home: Path, job: Job, row: InterpJob) -> None:
    """Seal or drop a failed or cancelled job's logs and error text once it ends, unless its grant keeps content.

    What the code printed or raised is the evaluator's content; the error code stays, so the job
    still says how it ended. A job held for review keeps them until the lab decides.
    """
    if job.status not in ("failed", "cancelled") or row.review_state == "pending":
        return
    plan = sealing.disposition(session, row.grant_id, "interp")
    if plan.action == "keep":
        return
    error = job.error if job.error and job.error.get("code") in CONTENT_ERRORS else None
    # Logs withheld past the review threshold stay with the lab's reviewers: never sealed out to the evaluator.
    if (row.logs or error) and not logs_withheld(row):
        text = row.logs + (f"\n[airlock] job error ({error['code']}): {error.get('message', '')}" if error else "")
        _seal_or_note(session, plan, job, kind="interp_logs", name="logs.txt", data=text.encode(), home=home)
    row.logs = ""
    if error is not None:
        job.error = {"code": error["code"], "message": _FORGOTTEN.format(status=job.status, code=error["code"])}
    # The terminal status event repeats the error: the same text goes there too.
    for item in session.scalars(select(JobEvent).where(JobEvent.job_id == job.id)):
        if not (isinstance(item.data, dict) and isinstance(item.data.get("error"), dict)):
            continue
        code = item.data["error"].get("code")
        if code in CONTENT_ERRORS:
            item.message = f"job {job.status} ({code})"
            item.data = {
                **item.data,
                "error": {"code": code, "message": _FORGOTTEN.format(status=job.status, code=code)},
            }
    job_id = job.id

    def discard(_session: Session) -> None:
        discard_result(home, job_id)

    event.listen(session, "after_commit", discard, once=True)


CONTENT_ERRORS = frozenset({"code_error", "runner_error", "invalid_result", "protocol_error"})
"""Job errors whose message quotes what the evaluator's code raised, printed or returned."""
_FORGOTTEN = (
    "the job {status} ({code}); its logs and error text are not kept readable after it ends (retention_interp): "
    "under 'sealed' they are sealed to your key (`airlock sealed list`), under 'full' the lab keeps them"
)


def sweep_unfetched(session: Session, home: Path, *, now: datetime, ttl_s: float) -> list[str]:
    """Seal or drop the logs and result files of jobs that ended over ``ttl_s`` seconds ago and were never fetched.

    Unless the grant keeps content: a result the evaluator fetched goes then (:func:`forget_result`);
    this bounds the rest.
    Returns the ids of the jobs swept. A job held for review waits for the lab's decision.
    """
    cutoff = now - timedelta(seconds=ttl_s)
    stmt = (
        select(Job, InterpJob)
        .join(InterpJob, InterpJob.id == Job.id)
        .where(
            Job.kind == KIND,
            Job.finished_at.is_not(None),
            Job.finished_at < cutoff,
            InterpJob.review_state != "pending",
            (InterpJob.logs != "") | InterpJob.result_sha256.is_not(None),
        )
    )
    swept: list[str] = []
    for job, row in session.execute(stmt).tuples().all():
        if not row.logs and not job_dir(home, job.id).exists():
            continue
        if sealing.disposition(session, row.grant_id, "interp").action == "keep":
            continue
        if row.review_state == "denied" or logs_withheld(row):
            # What the lab withheld is never sealed out to the evaluator: it is only dropped.
            row.logs = ""
            _discard_after_commit(session, home, job.id)
        else:
            forget_result(session, home, job, row)  # seals under `sealed`; drops the files after the commit
        swept.append(job.id)
    return swept


def _discard_after_commit(session: Session, home: Path, job_id: str) -> None:
    def discard(_session: Session) -> None:
        discard_result(home, job_id)

    event.listen(session, "after_commit", discard, once=True)


class UnfetchedSweeper(PeriodicWorker):
    """Sweeps, from a background thread, what :func:`sweep_unfetched` bounds (every replica may run one)."""

    name = "interp-sweeper"

    def __init__(self, db: Database, settings: Settings, clock: Callable[[], datetime] = utcnow) -> None:
        super().__init__(min(3600.0, max(1.0, settings.interp_result_ttl_s / 10)))
        self.db = db
        self.settings = settings
        self.clock = clock

    def run_once(self) -> list[str]:
        """Sweep once; return the ids of the jobs swept."""
        with self.db.session() as session:
            return sweep_unfetched(
                session, self.settings.artifacts_dir, now=self.clock(), ttl_s=self.settings.interp_result_ttl_s
            )


def forget_result(session: Session, home: Path, job: Job, row: InterpJob) -> None:
    """Seal or drop a delivered result's files and the job's logs unless its grant keeps content.

    The readable files go once the delivery commits; sealed copies are written before it.
    """
    plan = sealing.disposition(session, row.grant_id, "interp")
    if plan.action == "keep":
        return
    directory = job_dir(home, job.id)
    for kind, name in (("interp_result", "result.json"), ("interp_arrays", "result.npz")):
        path = directory / name
        if path.is_file():
            _seal_or_note(session, plan, job, kind=kind, name=name, data=path.read_bytes(), home=home)
    if row.logs:
        _seal_or_note(session, plan, job, kind="interp_logs", name="logs.txt", data=row.logs.encode(), home=home)
    row.logs = ""
    job_id = job.id

    def discard(_session: Session) -> None:
        discard_result(home, job_id)

    event.listen(session, "after_commit", discard, once=True)


def _seal_or_note(
    session: Session, plan: sealing.Disposition, job: Job, *, kind: str, name: str, data: bytes, home: Path | None
) -> None:
    """Seal one piece of a job's content as ``plan`` says, and say in the job's events what became of it."""
    item = sealing.dispose(session, plan, kind=kind, ref=job.id, name=name, data=data, home=home)
    if item is not None:
        jobs.add_event(session, job.id, f"{name} sealed to the evaluator's key as {item.id}", type="message")
    elif plan.action == "seal" or plan.reason:
        jobs.add_event(session, job.id, f"{name}: {plan.reason or 'sealing failed; dropped'}", type="message")


# ---------------------------------------------------------------------------------- ledger


def record_ledger(session: Session, job: Job, row: InterpJob, *, event: str, status: str | None = None) -> None:
    """Record an interp job's outcome (or review) on the public ledger; arguments stay confidential."""
    body = {
        "event": event,
        "job_id": job.id,
        "grant_id": row.grant_id,
        "model": row.model,
        "variant_id": row.variant_id,
        "model_version_hash": row.content_hash,
        "status": status or job.status,
        "result_bytes": row.result_bytes,
        # The digest of the JSON values and the arrays together (client.result_sha256, RESULT_FORMAT).
        "result_sha256": row.result_sha256,
        "result_format": RESULT_FORMAT if row.result_sha256 else None,
        "review": row.review_state,
        "cpu_seconds": round(row.cpu_seconds, 3),
        "served_bytes": int(row.served_bytes or 0),
    }
    # Arguments are the evaluator's content: a grant that keeps none commits to their digest instead
    # (the commitment's opening is stored, so the value itself would outlive the job).
    args: Any = row.args
    if not keeps_content(session, row):
        args = {"sha256": hashlib.sha256(json.dumps(row.args, sort_keys=True).encode()).hexdigest()}
    confidential = {"code_sha256": row.code_sha256, "args": args, "review_note": row.review_note}
    ledger.record_event(session, "interp.job", body, confidential=confidential)
