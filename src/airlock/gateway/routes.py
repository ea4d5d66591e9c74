"""OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from airlock.access.service import granted_model_ids
from airlock.backends.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from airlock.gateway import serving
from airlock.gateway.deps import AuditDep, CurrentPrincipal, StateDep

router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/models", response_model=ModelList)
async def list_models(state: StateDep, principal: CurrentPrincipal) -> ModelList:
    """List the model ids this key may sample (nothing else is revealed)."""

    def _ids() -> list[str]:
        with state.db.session() as session:
            return granted_model_ids(session, principal)

    ids = await run_in_threadpool(_ids)
    return ModelList(data=[ModelCard(id=i, owned_by=principal.grant.model_id) for i in ids])


async def _streaming_response(body: AsyncIterator[str]) -> StreamingResponse:
    # Pull the first event before committing to a 200 so early failures keep their status code.
    first = await body.__anext__()

    async def _rest() -> AsyncIterator[str]:
        yield first
        async for event in body:
            yield event

    return StreamingResponse(_rest(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, state: StateDep, principal: CurrentPrincipal, audit: AuditDep
) -> ChatCompletion | StreamingResponse:
    """Create a chat completion on a granted variant."""
    target = await serving.prepare(state, principal, audit, body)
    if body.stream:
        return await _streaming_response(serving.stream(target, body, audit))
    return await serving.chat(target, body, audit)


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest, state: StateDep, principal: CurrentPrincipal, audit: AuditDep
) -> Completion | StreamingResponse:
    """Create a text completion on a granted variant (supports ``echo`` + ``logprobs``)."""
    target = await serving.prepare(state, principal, audit, body)
    if body.stream:
        return await _streaming_response(serving.stream(target, body, audit))
    return await serving.complete(target, body, audit)
