"""OpenAI-compatible ``/v1/files`` routes (evaluator keys; uploading needs the ``finetune`` scope)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from airlock.access.service import check_window
from airlock.deps import AuditDep, CurrentPrincipal, SessionDep, StateDep
from airlock.errors import PermissionDeniedError
from airlock.finetune import files as service
from airlock.finetune import noise
from airlock.finetune import service as ft_service
from airlock.finetune.jobs import KIND
from airlock.finetune.schemas import (
    FileDeleted,
    FileList,
    FileObject,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCheckpointList,
    FineTuningJobCreate,
    FineTuningJobEvent,
    FineTuningJobEventList,
    FineTuningJobList,
)
from airlock.ids import checkpoint_model_id
from airlock.jobs import service as jobs_service
from airlock.web.routing import route_methods
from airlock.web.uploads import read_upload

router = APIRouter(prefix="/v1", tags=["evaluator: files"])


@router.post("/files", response_model=FileObject)
async def upload_file(
    state: StateDep,
    principal: CurrentPrincipal,
    audit: AuditDep,
    file: Annotated[UploadFile, File(description="JSONL training data.")],
    purpose: Annotated[str, Form(description="`fine-tune`.")],
) -> FileObject:
    """Upload a training file; it is validated before anything is stored."""
    audit.scope = "finetune"
    check_window(principal.grant)
    if "finetune" not in principal.grant.scopes:
        raise PermissionDeniedError("your grant lacks the scope(s) ['finetune']", code="scope_not_granted")
    data = await read_upload(file, service.max_file_bytes())
    home = state.settings.artifacts_dir

    def store() -> FileObject:
        with state.db.sessions() as session:
            row = service.create_file(
                session,
                home,
                evaluator_id=principal.evaluator_id,
                grant_id=principal.grant_id,
                filename=file.filename or "upload.jsonl",
                purpose=purpose,
                data=data,
            )
            try:
                session.commit()
            except BaseException:
                # The bytes are durable before the row; a failed commit must not leave them behind.
                session.rollback()
                service.discard_bytes(home, row.id)
                raise
            return FileObject.of(row)

    obj = await run_in_threadpool(store)
    audit.detail["file_id"] = obj.id
    audit.detail["bytes"] = obj.bytes
    return obj


@router.get("/files", response_model=FileList)
def list_files(
    session: SessionDep,
    principal: CurrentPrincipal,
    audit: AuditDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    """List your organisation's files, newest first."""
    audit.scope = "finetune"
    rows, has_more = service.list_files(
        session, principal.evaluator_id, purpose=purpose, after=after, limit=limit, order=order
    )
    data = [FileObject.of(r) for r in rows]
    return FileList(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/files/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep) -> FileObject:
    """Describe one of your organisation's files."""
    audit.scope = "finetune"
    audit.detail["file_id"] = file_id
    return FileObject.of(service.get_file(session, file_id, principal.evaluator_id))


@router.get("/files/{file_id}/content")
def file_content(
    file_id: str, state: StateDep, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> Response:
    """Return the bytes of one of your organisation's files."""
    audit.scope = "finetune"
    audit.detail["file_id"] = file_id
    _row, data = service.read_content(session, state.settings.artifacts_dir, file_id, principal.evaluator_id)
    return Response(content=data, media_type="application/octet-stream")


@router.delete("/files/{file_id}", response_model=FileDeleted)
def delete_file(
    file_id: str, state: StateDep, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> FileDeleted:
    """Delete one of your organisation's files (row first, then the bytes)."""
    audit.scope = "finetune"
    audit.detail["file_id"] = file_id
    service.delete_file(session, file_id, principal.evaluator_id)
    # Commit before removing the bytes: a failed commit then leaves the file whole, not a row without bytes.
    session.commit()
    service.discard_bytes(state.settings.artifacts_dir, file_id)
    return FileDeleted(id=file_id, deleted=True)


# ---------------------------------------------------------------- noise-injection jobs

noise_router = APIRouter(prefix="/v1/airlock/noise", tags=["evaluator: noise injection"])


@noise_router.post("/jobs", response_model=noise.NoiseJobPublic, status_code=201)
def create_noise_job(
    body: noise.NoiseJobCreate, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> noise.NoiseJobPublic:
    """Ask for noised copies of a granted local variant, one per (sigma, seed), only your grant may sample."""
    audit.scope = "finetune"
    audit.model = body.model
    job = noise.create_noise_job(session, principal, body)
    audit.detail["job_id"] = job.id
    return noise.to_public(job)


@noise_router.get("/jobs", response_model=list[noise.NoiseJobPublic])
def list_noise_jobs(session: SessionDep, principal: CurrentPrincipal, audit: AuditDep) -> list[noise.NoiseJobPublic]:
    """List your grant's noise-injection jobs, newest first."""
    audit.scope = "finetune"
    return [noise.to_public(j) for j in noise.list_own_noise_jobs(session, principal)]


@noise_router.get("/jobs/{job_id}", response_model=noise.NoiseJobPublic)
def retrieve_noise_job(
    job_id: str, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> noise.NoiseJobPublic:
    """Describe one of your noise-injection jobs and its variants."""
    audit.scope = "finetune"
    audit.detail["job_id"] = job_id
    return noise.to_public(noise.get_own_noise_job(session, principal, job_id))


# ---------------------------------------------------------------- fine-tuning jobs


@router.post("/fine_tuning/jobs", response_model=FineTuningJob)
def create_fine_tuning_job(
    body: FineTuningJobCreate, state: StateDep, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> FineTuningJob:
    """Queue LoRA fine-tuning of a granted variant on your uploaded file (needs the `finetune` scope)."""
    audit.scope = "finetune"
    audit.model = body.model
    job = ft_service.create_job(session, state.registry, principal, body)
    audit.detail["job_id"] = job.id
    return ft_service.to_public(job)


@router.get("/fine_tuning/jobs", response_model=FineTuningJobList)
def list_fine_tuning_jobs(
    session: SessionDep,
    principal: CurrentPrincipal,
    audit: AuditDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> FineTuningJobList:
    """List your grant's fine-tuning jobs, newest first (cursor paging with `after`)."""
    audit.scope = "finetune"
    rows, has_more = jobs_service.list_jobs(session, principal.evaluator_id, after=after, limit=limit, kind=KIND)
    own = [r for r in rows if r.grant_id == principal.grant_id]
    return FineTuningJobList(data=[ft_service.to_public(r) for r in own], has_more=has_more)


@router.get("/fine_tuning/jobs/{job_id}", response_model=FineTuningJob)
def retrieve_fine_tuning_job(
    job_id: str, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> FineTuningJob:
    """Describe one of your fine-tuning jobs."""
    audit.scope = "finetune"
    audit.detail["job_id"] = job_id
    return ft_service.to_public(ft_service.get_own_job(session, principal, job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJob)
def cancel_fine_tuning_job(
    job_id: str, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> FineTuningJob:
    """Cancel a queued or running job (a running one stops within seconds)."""
    audit.scope = "finetune"
    audit.detail["job_id"] = job_id
    ft_service.get_own_job(session, principal, job_id)
    return ft_service.to_public(jobs_service.request_cancel(session, job_id))


@router.get("/fine_tuning/jobs/{job_id}/events", response_model=FineTuningJobEventList)
def fine_tuning_job_events(
    job_id: str,
    session: SessionDep,
    principal: CurrentPrincipal,
    audit: AuditDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> FineTuningJobEventList:
    """Progress and metrics events of a job, newest first."""
    audit.scope = "finetune"
    ft_service.get_own_job(session, principal, job_id)
    cursor = int(after.removeprefix("ftevent-")) if after and after.removeprefix("ftevent-").isdigit() else None
    events, has_more = jobs_service.list_events(session, job_id, after=cursor, limit=limit, newest_first=True)
    return FineTuningJobEventList(
        data=[
            FineTuningJobEvent(
                id=f"ftevent-{e.id}",
                created_at=int(e.ts.timestamp()),
                message=e.message,
                data=e.data or None,
                type="metrics" if e.type == "metrics" else "message",
                level="error" if (e.data or {}).get("status") == "failed" else "info",
            )
            for e in events
        ],
        has_more=has_more,
    )


@router.get("/fine_tuning/jobs/{job_id}/checkpoints", response_model=FineTuningJobCheckpointList)
def fine_tuning_job_checkpoints(
    job_id: str, session: SessionDep, principal: CurrentPrincipal, audit: AuditDep
) -> FineTuningJobCheckpointList:
    """Training checkpoints with their losses; each is sampleable by its model id (its weights never leave)."""
    audit.scope = "finetune"
    job = ft_service.get_own_job(session, principal, job_id)
    entries = list((job.result or {}).get("checkpoints") or [])
    model_id = job.params.get("fine_tuned_model", "")
    data = [
        FineTuningJobCheckpoint(
            id=f"ftckpt-{job.id}-{c['step']}",
            created_at=int((job.finished_at or job.created_at).timestamp()),
            fine_tuned_model_checkpoint=checkpoint_model_id(model_id, int(c["step"])),
            fine_tuning_job_id=job.id,
            metrics={"step": float(c["step"]), "train_loss": c.get("train_loss"), "valid_loss": c.get("valid_loss")},
            step_number=int(c["step"]),
        )
        for c in reversed(entries)
    ]
    return FineTuningJobCheckpointList(
        data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )


async def _not_another_routes_path(request: Request) -> None:
    """Answer 405 (``Allow`` from the documented routes) where the catch-all below only shadows one.

    ``GET …/{job_id}/cancel`` matches the catch-all's pattern, but the path belongs to the ``POST``
    route: the caller used the wrong method, and is told so before any credential is checked.
    """
    if route_methods(request.app, request.url.path, documented_only=True):
        raise StarletteHTTPException(405)


@router.get("/fine_tuning/jobs/{job_id}/{artifact}", include_in_schema=False)
def adapter_export_forbidden(
    job_id: str,
    artifact: str,
    _routed: Annotated[None, Depends(_not_another_routes_path)],
    principal: CurrentPrincipal,
    audit: AuditDep,
) -> None:
    """Refuse every attempt to fetch adapter or checkpoint weights; the attempt is audited."""
    audit.scope = "finetune"
    audit.detail.update({"job_id": job_id, "artifact": artifact[:100], "attempt": "weights_export"})
    raise PermissionDeniedError(
        "fine-tuned weights never leave the lab; sample the fine-tuned model through the API instead",
        code="weights_export_forbidden",
    )
