"""Public, unauthenticated ledger API (still audited) and the admin route that signs a checkpoint on demand."""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse

from airlock.access.roles import Permission
from airlock.access.service import AdminPrincipal
from airlock.deps import SessionDep, StateDep, require
from airlock.errors import InvalidRequestError, NotFoundError
from airlock.ledger import service
from airlock.ledger.schemas import (
    CheckpointPublic,
    ConsistencyProofPublic,
    EntriesPublic,
    EntryPublic,
    InclusionProofPublic,
)

router = APIRouter(prefix="/public/ledger", tags=["public: ledger"])
admin_router = APIRouter(prefix="/v1/airlock/admin/ledger", tags=["admin: ledger"])


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


@router.get("/checkpoint", response_class=PlainTextResponse)
def checkpoint(session: SessionDep) -> PlainTextResponse:
    """Return the newest signed checkpoint (C2SP signed note, text/plain)."""
    row = service.latest_checkpoint(session)
    if row is None:
        raise NotFoundError("no checkpoint has been published yet")
    return PlainTextResponse(row.note)


@router.get("/pubkey", response_class=PlainTextResponse)
def pubkey(state: StateDep) -> PlainTextResponse:
    """Return the lab's checkpoint verifier key (``<name>+<hex id>+<base64 key>``)."""
    return PlainTextResponse(service.get_signer(state.settings).verifier.vkey() + "\n")


@router.get("/entries", response_model=EntriesPublic)
def entries(session: SessionDep, start: int = Query(ge=0), end: int = Query(gt=0)) -> EntriesPublic:
    """Return entries ``[start, end)`` (at most 1000; ``end`` is clamped to the tree size)."""
    rows = service.get_entries(session, start, end)
    return EntriesPublic(
        tree_size=service.tree_head(session).size,
        start=start,
        end=start + len(rows),
        entries=[EntryPublic(index=r.idx, leaf_hash=_b64(r.leaf_hash), entry=r.entry) for r in rows],
    )


@router.get("/proof/inclusion", response_model=InclusionProofPublic)
def inclusion(session: SessionDep, index: int = Query(ge=0), size: int = Query(gt=0)) -> InclusionProofPublic:
    """Return the proof that entry ``index`` is in the tree of ``size`` entries."""
    p = service.inclusion_proof(session, index, size)
    return InclusionProofPublic(
        index=p.index, size=p.size, leaf_hash=_b64(p.leaf_hash), proof=[_b64(h) for h in p.proof], root=_b64(p.root)
    )


@router.get("/proof/consistency", response_model=ConsistencyProofPublic)
def consistency(session: SessionDep, old: int = Query(gt=0), new: int = Query(gt=0)) -> ConsistencyProofPublic:
    """Return the proof that the tree of ``old`` entries is a prefix of the tree of ``new`` entries."""
    if old > new:
        raise InvalidRequestError(f"old ({old}) must not exceed new ({new})", param="old")
    proof = service.consistency_proof(session, old, new)
    return ConsistencyProofPublic(
        old=old,
        new=new,
        old_root=_b64(service.root_at(session, old)),
        new_root=_b64(service.root_at(session, new)),
        proof=[_b64(h) for h in proof],
    )


@admin_router.post("/checkpoint", response_model=CheckpointPublic, status_code=201)
async def publish(
    state: StateDep, admin: Annotated[AdminPrincipal, require(Permission.LEDGER_CHECKPOINT)]
) -> CheckpointPublic:
    """Integrate pending events and sign a checkpoint now."""
    signer = service.get_signer(state.settings)
    row = await run_in_threadpool(service.publish_checkpoint, state.db, signer)
    return CheckpointPublic(size=row.size, root=_b64(row.root_hash), note=row.note)
