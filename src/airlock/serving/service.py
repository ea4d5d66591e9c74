"""The sampling path: authorize, check quotas, run the variant pipeline, account tokens."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from airlock.access.middleware import AuditContext
from airlock.access.quotas import check_token_quota
from airlock.access.service import Principal, authorize
from airlock.backends.pool import VariantRuntimeSpec
from airlock.backends.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    Usage,
)
from airlock.deps import GatewayState
from airlock.errors import AirlockError, InvalidRequestError, NotFoundError
from airlock.finetune.service import get_own_job as ft_get_own_job
from airlock.ids import is_fine_tuned, parse_fine_tuned_id, parse_model_id
from airlock.mitigations import MitigatedStream, VariantPipeline, Verdict
from airlock.registry.service import ResolvedVariant


@dataclass
class Target:
    """The authorized variant a request will be served by."""

    public_id: str
    backend: VariantPipeline


async def prepare(
    state: GatewayState,
    principal: Principal,
    audit: AuditContext,
    request: ChatCompletionRequest | CompletionRequest,
) -> Target:
    """Authorize the request against the grant, enforce quotas and return its pipeline."""
    audit.model = request.model
    if is_fine_tuned(request.model):
        return await _prepare_fine_tuned(state, principal, audit, request)
    ref = parse_model_id(request.model)
    audit.variant = ref.variant
    scopes = ["sample"] + (["logprobs"] if request.wants_logprobs() else [])
    audit.scope = ",".join(scopes)

    resolved = state.registry.peek(ref)
    if resolved is None:
        resolved = await run_in_threadpool(state.registry.get, state.db.sessions, ref)
    audit.version_id = resolved.version_id
    authorize(principal, resolved, scopes)
    check_output_budget(request, resolved)
    spec = VariantRuntimeSpec.of(resolved)
    check_token_quota(principal.grant)
    if principal.grant.quota_requests_per_minute:
        state.limiter.hit(principal.grant_id, principal.grant.quota_requests_per_minute)
    backend = await state.pipelines.pipeline(spec)
    if request.wants_logprobs() and not backend.supports_logprobs:
        raise InvalidRequestError(f"variant {ref.variant!r} cannot return log-probabilities", param="logprobs")
    if isinstance(request, CompletionRequest) and request.echo and not backend.supports_echo:
        raise InvalidRequestError(f"variant {ref.variant!r} does not support echo", param="echo")
    return Target(public_id=request.model, backend=backend)


async def _prepare_fine_tuned(
    state: GatewayState,
    principal: Principal,
    audit: AuditContext,
    request: ChatCompletionRequest | CompletionRequest,
) -> Target:
    """Authorize a fine-tuned model: only keys of the grant that trained it may sample it."""
    from airlock.finetune.jobs import FineTuneHandler

    ft = parse_fine_tuned_id(request.model)
    if ft.checkpoint_step is not None:
        raise InvalidRequestError(
            f"training checkpoints are listed for their metrics but not served; sample {ft.model_id!r}",
            code="checkpoint_not_served",
            param="model",
        )
    audit.variant = ft.base.variant
    scopes = ["sample"] + (["logprobs"] if request.wants_logprobs() else [])
    audit.scope = ",".join(scopes)

    def _lookup() -> ResolvedVariant:
        with state.db.session() as session:
            job = ft_get_own_job(session, principal, ft.job_id)
            if job.status != "succeeded" or job.params.get("fine_tuned_model") != request.model:
                raise NotFoundError(f"model {request.model!r} does not exist", code="model_not_found")
        return state.registry.get(state.db.sessions, ft.base)

    resolved = await run_in_threadpool(_lookup)
    audit.version_id = resolved.version_id
    audit.detail["fine_tuning_job"] = ft.job_id
    authorize(principal, resolved, scopes)
    check_output_budget(request, resolved)
    check_token_quota(principal.grant)
    if principal.grant.quota_requests_per_minute:
        state.limiter.hit(principal.grant_id, principal.grant.quota_requests_per_minute)
    adapter = FineTuneHandler(state.settings.home_dir).output_dir(ft.job_id) / "adapter"
    backend = await state.pipelines.adapter_pipeline(VariantRuntimeSpec.of(resolved), ft.job_id, adapter)
    return Target(public_id=request.model, backend=backend)


def check_output_budget(request: ChatCompletionRequest | CompletionRequest, resolved: ResolvedVariant) -> None:
    """Refuse (400 ``invalid_value``) a token budget above the variant's cap, before any work is queued."""
    limit = resolved.output_token_limit()
    budgets = [("max_tokens", request.max_tokens)]
    if isinstance(request, ChatCompletionRequest):
        budgets.append(("max_completion_tokens", request.max_completion_tokens))
    for param, value in budgets:
        if value is not None and value > limit:
            raise InvalidRequestError(
                f"{param} is {value}, more than the {limit} tokens per choice that {request.model!r} generates; "
                f"ask for at most {limit}",
                code="invalid_value",
                param=param,
            )


def _account(audit: AuditContext, usage: Usage | None, verdicts: list[Verdict]) -> None:
    if usage is not None:
        audit.tokens_in = usage.prompt_tokens
        audit.tokens_out = usage.completion_tokens
    if verdicts:
        audit.detail["mitigations"] = [
            {"name": v.mitigation, "kind": v.kind, "stage": v.stage, "blocked": v.blocked, "reason": v.reason}
            for v in verdicts
        ]
        if any(v.blocked for v in verdicts):
            audit.outcome = "blocked"


async def chat(target: Target, request: ChatCompletionRequest, audit: AuditContext) -> ChatCompletion:
    """Serve a non-streaming chat completion."""
    screened = await target.backend.screened_chat(request)
    result = screened.result
    result.model = target.public_id
    _account(audit, result.usage, screened.verdicts)
    return result


async def complete(target: Target, request: CompletionRequest, audit: AuditContext) -> Completion:
    """Serve a non-streaming text completion."""
    screened = await target.backend.screened_complete(request)
    result = screened.result
    result.model = target.public_id
    _account(audit, result.usage, screened.verdicts)
    return result


def _sse(obj: BaseModel | dict[str, Any]) -> str:
    data = obj.model_dump_json(exclude_none=False) if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


async def stream(
    target: Target,
    request: ChatCompletionRequest | CompletionRequest,
    audit: AuditContext,
) -> AsyncIterator[str]:
    """Serve a completion as server-sent events, accounting usage from the final chunk.

    The stream's first event is produced before the HTTP response starts (see routes), so
    errors that happen before any token (bad input, backend down) still get a proper status.
    """
    screened: MitigatedStream[ChatCompletionChunk] | MitigatedStream[Completion]
    if isinstance(request, ChatCompletionRequest):
        screened = target.backend.screened_chat_stream(request)
    else:
        screened = target.backend.screened_complete_stream(request)
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    usage: Usage | None = None
    sent = False
    try:
        async for chunk in screened.chunks:
            chunk.model = target.public_id
            if chunk.usage is not None and not chunk.choices:
                usage = chunk.usage
                if include_usage:
                    yield _sse(chunk)
                continue
            if not include_usage:
                chunk.usage = None
            yield _sse(chunk)
            sent = True
    except AirlockError as exc:
        if not sent:
            raise  # nothing sent yet: the route turns it into a proper HTTP error status
        # Headers are already sent: report the failure in-band, as OpenAI does.
        audit.error_code = exc.code
        audit.outcome = "error"
        yield _sse(exc.to_openai())
    finally:
        _account(audit, usage, screened.verdicts)
    yield "data: [DONE]\n\n"
