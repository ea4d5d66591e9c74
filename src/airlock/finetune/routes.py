"""OpenAI-compatible ``/v1/files`` routes (evaluator keys; uploading needs the ``finetune`` scope)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from airlock.access.service import check_window
from airlock.errors import InvalidRequestError, PermissionDeniedError
from airlock.finetune import files as service
from airlock.finetune.schemas import FileDeleted, FileList, FileObject
from airlock.gateway.deps import AuditDep, CurrentPrincipal, SessionDep, StateDep

router = APIRouter(prefix="/v1", tags=["evaluator: files"])

_CHUNK = 1024 * 1024


async def _read_limited(upload: UploadFile, limit: int) -> bytes:
    # Read at most limit + 1 bytes so an oversized upload never sits in memory whole.
    chunks: list[bytes] = []
    size = 0
    while chunk := await upload.read(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise InvalidRequestError(f"file is over the limit of {limit} bytes", code="file_too_large", param="file")
        chunks.append(chunk)
    return b"".join(chunks)


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
    data = await _read_limited(file, service.max_file_bytes())
    home = state.settings.home_dir

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
    _row, data = service.read_content(session, state.settings.home_dir, file_id, principal.evaluator_id)
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
    service.discard_bytes(state.settings.home_dir, file_id)
    return FileDeleted(id=file_id, deleted=True)
