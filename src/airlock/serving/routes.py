"""OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Any, ClassVar

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from airlock.access.middleware import AuditContext, AuditMiddleware
from airlock.access.service import grant_status, granted_model_ids
from airlock.backends.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from airlock.backends.tokenization import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from airlock.deps import AuditDep, CurrentPrincipal, GatewayState, StateDep, authenticate_evaluator
from airlock.errors import AirlockError, InvalidRequestError, NotFoundError, PermissionDeniedError
from airlock.finetune.service import succeeded_jobs
from airlock.registry.models import Model, ModelVersion
from airlock.serving import responses
from airlock.serving import service as serving
from airlock.serving.responses import ResponsesRequest, to_chat_request
from airlock.serving.tokenization import tokenizer_backend
from airlock.web.errors import airlock_error_response

router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/models", response_model=ModelList)
async def list_models(state: StateDep, principal: CurrentPrincipal) -> ModelList:
    """List the model ids this key may sample (nothing else is revealed)."""

    def _ids() -> list[str]:
        with state.db.session() as session:
            ids = granted_model_ids(session, principal)
            if ids:  # fine-tuned models are listed only to keys of the grant that trained them
                ids += [j.params["fine_tuned_model"] for j in succeeded_jobs(session, principal.grant_id)]
            return ids

    ids = await run_in_threadpool(_ids)
    return ModelList(data=[ModelCard(id=i, owned_by=principal.grant.model_id) for i in ids])


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, state: StateDep, principal: CurrentPrincipal, audit: AuditDep) -> ModelCard:
    """Describe one model id this key may sample; any other id is a 404, whether it exists or not."""
    try:
        await serving.resolve_target(state, principal, model_id, ["sample"], audit)
    except (InvalidRequestError, PermissionDeniedError, NotFoundError):
        # OpenAI answers the same 404 for a model that does not exist and one the key may not use.
        raise NotFoundError(
            f"the model {model_id!r} does not exist or you do not have access to it",
            code="model_not_found",
            param="model",
        ) from None
    return ModelCard(id=model_id, owned_by=principal.grant.model_id)


def _json(result: ChatCompletion | Completion) -> Response:
    # Serialised by pydantic in one pass; FastAPI's generic encoder walks the model field by field.
    return Response(result.model_dump_json(), media_type="application/json")


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
) -> Response:
    """Create a chat completion on a granted variant."""
    target = await serving.prepare(state, principal, audit, body)
    if body.stream:
        return await _streaming_response(serving.stream(target, body, audit))
    return _json(await serving.chat(target, body, audit))


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest, state: StateDep, principal: CurrentPrincipal, audit: AuditDep
) -> Response:
    """Create a text completion on a granted variant (supports ``echo`` + ``logprobs``)."""
    target = await serving.prepare(state, principal, audit, body)
    if body.stream:
        return await _streaming_response(serving.stream(target, body, audit))
    return _json(await serving.complete(target, body, audit))


@router.post("/responses", response_model=None)
async def create_response(
    body: ResponsesRequest, state: StateDep, principal: CurrentPrincipal, audit: AuditDep
) -> dict[str, Any] | StreamingResponse:
    """Create a response (OpenAI's Responses API: text and function calls) on a granted variant."""
    chat = to_chat_request(body)
    target = await serving.prepare(state, principal, audit, chat)
    if body.stream:
        return await _streaming_response(responses.stream_response(target, body, chat, audit))
    return await responses.create_response(target, body, chat, audit)


airlock_router = APIRouter(prefix="/v1/airlock", tags=["evaluator"])


class GrantInfo(BaseModel):
    """The caller's own grant, as the evaluator sees it."""

    grant_id: str
    evaluator: str
    model: str
    variants: list[str]
    scopes: list[str]
    not_before: datetime
    not_after: datetime | None
    status: str


class MitigationInfo(BaseModel):
    """A mitigation of a variant and the lab's stance on it."""

    name: str
    kind: str
    stance: str | None


class VariantInfo(BaseModel):
    """Provenance of a granted variant: what an eval log must record about its target."""

    id: str
    model: str
    version: str
    version_hash: str
    stage: str
    variant: str
    grant_id: str
    mitigations: list[MitigationInfo]
    max_output_tokens: int = Field(description="Most tokens one choice may generate (`max_tokens` above it: 400).")
    fine_tuning_job: str | None = None
    noise: dict[str, Any] | None = Field(
        default=None, description="For a noise-injected variant: `sigma`, `seed`, the job and when it expires."
    )


@airlock_router.get("/grant", response_model=GrantInfo)
async def my_grant(state: StateDep, principal: CurrentPrincipal) -> GrantInfo:
    """Describe the grant the calling key belongs to."""
    grant = principal.grant

    def _model_name() -> str:
        with state.db.session() as session:
            model = session.get(Model, grant.model_id)
            return model.name if model else grant.model_id

    return GrantInfo(
        grant_id=grant.id,
        evaluator=principal.evaluator_name,
        model=await run_in_threadpool(_model_name),
        variants=list(grant.variants),
        scopes=list(grant.scopes),
        not_before=grant.not_before,
        not_after=grant.not_after,
        status=grant_status(grant),
    )


@airlock_router.get("/models/{model_id:path}", response_model=VariantInfo)
async def variant_info(model_id: str, state: StateDep, principal: CurrentPrincipal, audit: AuditDep) -> VariantInfo:
    """Describe a granted variant: version hash, stage and mitigation stances (for eval logs).

    A fine-tuned model (``ft:...``) of the caller's grant is described by its base variant, with
    the job that trained it.
    """
    target = await serving.resolve_target(state, principal, model_id, [], audit)
    resolved = target.variant
    job_id = target.fine_tune.job_id if target.fine_tune is not None else None

    def _version() -> tuple[str, str]:
        with state.db.session() as session:
            version = session.get(ModelVersion, resolved.version_id)
            assert version is not None
            return version.content_hash, version.stage

    version_hash, stage = await run_in_threadpool(_version)
    return VariantInfo(
        id=model_id,
        model=resolved.model_name,
        version=resolved.version_label,
        version_hash=version_hash,
        stage=stage,
        variant=resolved.variant_name,
        grant_id=principal.grant_id,
        mitigations=[MitigationInfo(name=m["name"], kind=m["kind"], stance=m["stance"]) for m in resolved.mitigations],
        max_output_tokens=resolved.output_token_limit(),
        fine_tuning_job=job_id,
        noise=(
            {
                "sigma": target.noise.sigma,
                "seed": target.noise.seed,
                "job": target.noise.job_id,
                "expires_at": target.noise_expires_at.isoformat() if target.noise_expires_at else None,
            }
            if target.noise is not None
            else None
        ),
    )


tokenizer_router = APIRouter(tags=["tokenizer"])


@tokenizer_router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(
    body: TokenizeCompletionRequest | TokenizeChatRequest, state: StateDep, principal: CurrentPrincipal, audit: AuditDep
) -> TokenizeResponse:
    """Tokenize a prompt or chat with a granted variant's tokenizer (vLLM's `/tokenize`)."""
    backend = await tokenizer_backend(state, principal, audit, body.model)
    return await backend.tokenize(body)


@tokenizer_router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(
    body: DetokenizeRequest, state: StateDep, principal: CurrentPrincipal, audit: AuditDep
) -> DetokenizeResponse:
    """Turn token ids back into text with a granted variant's tokenizer (vLLM's `/detokenize`)."""
    backend = await tokenizer_backend(state, principal, audit, body.model)
    return await backend.detokenize(body)


@tokenizer_router.get("/tokenizer_info", response_model=dict[str, Any])
async def tokenizer_info(
    state: StateDep, principal: CurrentPrincipal, audit: AuditDep, model: str | None = None
) -> dict[str, Any]:
    """Describe a granted variant's tokenizer: special tokens, chat template (vLLM's `/tokenizer_info`)."""
    backend = await tokenizer_backend(state, principal, audit, model)
    return await backend.tokenizer_info()


class SamplingFastPath:
    """The gateway's outermost ASGI layer: serves non-streaming ``POST /v1/chat/completions`` and ``/v1/completions``.

    FastAPI's routing, dependency resolution and middleware stack cost more per request than the
    rest of a proxied call. This path runs the very same steps as the routes above
    (authentication through the revocation-aware cache, ``serving.prepare``: grant, scopes,
    variant, quotas, the variant's mitigation pipeline) inside the same audit
    (``AuditMiddleware.audited``: request id, body limit, JSON 500 on a bug, one audit event per
    request, metrics) and answers errors with the same handler. Anything it does not serve exactly
    as the routes would (a body declared too large, one that is not a JSON object of the request
    model, another content type, a stream) goes to ``app``, the full application, unchanged, so its
    validation errors and streaming stay the one implementation. ``scope["app"]`` must be the
    gateway's FastAPI app (its ``state.gateway``).
    """

    _MODELS: ClassVar[Mapping[str, type[ChatCompletionRequest] | type[CompletionRequest]]] = {
        "/v1/chat/completions": ChatCompletionRequest,
        "/v1/completions": CompletionRequest,
    }

    def __init__(self, app: ASGIApp, audit: AuditMiddleware) -> None:
        self.app = app
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        model = self._MODELS.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if model is None or self.audit.too_large(scope):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        authorization = ""
        json_body = False
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-type":
                json_body = value.split(b";", 1)[0].strip().lower() == b"application/json"
        body = await _read_body(receive)
        request = _parse(model, body) if json_body else None
        if request is None or request.stream:
            await self.app(scope, _replay(body, receive), send)
            return

        async def serve(reply: Send) -> None:
            await _serve(scope, receive, reply, request, authorization)

        await self.audit.audited(scope, send, serve, started)


async def _serve(
    scope: Scope, receive: Receive, send: Send, request: ChatCompletionRequest | CompletionRequest, authorization: str
) -> None:
    """Serve one parsed non-streaming request inside its audit, as the routes would."""
    audit: AuditContext = scope["airlock.audit"]
    state: GatewayState = scope["app"].state.gateway
    try:
        principal = await authenticate_evaluator(state, authorization, audit)
        target = await serving.prepare(state, principal, audit, request)
        if isinstance(request, ChatCompletionRequest):
            result: ChatCompletion | Completion = await serving.chat(target, request, audit)
        else:
            result = await serving.complete(target, request, audit)
    except AirlockError as exc:
        await airlock_error_response(scope, exc)(scope, receive, send)
        return
    payload = result.model_dump_json().encode()
    headers = [(b"content-length", str(len(payload)).encode()), (b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _read_body(receive: Receive) -> bytes:
    """Read a request's whole body (the audit middleware has already refused one declared too large)."""
    parts = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    """Return a ``receive`` that yields ``body`` once, then whatever the client sends next (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _parse(
    model: type[ChatCompletionRequest] | type[CompletionRequest], body: bytes
) -> ChatCompletionRequest | CompletionRequest | None:
    """Validate ``body`` as the routes do (``json.loads``, then the model); None when it does not validate."""
    try:
        data = json.loads(body)
        return model.model_validate(data, from_attributes=True)
    except (ValueError, ValidationError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
