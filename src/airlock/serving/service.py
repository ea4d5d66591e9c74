"""The sampling path: authorize, check quotas, run the variant pipeline, account tokens."""

from __future__ import annotations

import json
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from airlock.access.middleware import AuditContext
from airlock.access.models import Grant
from airlock.access.quotas import RateLimiter, SamplingTerms, check_token_quota, tokens_used
from airlock.access.service import Principal, authorize
from airlock.access.terms import terms_of
from airlock.backends.pool import VariantRuntimeSpec
from airlock.backends.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    Usage,
)
from airlock.config import Settings
from airlock.db import Database
from airlock.errors import AirlockError, InvalidRequestError, NotFoundError
from airlock.finetune.adapters import AdapterStore
from airlock.finetune.noise import noised_variant
from airlock.finetune.service import get_own_job as ft_get_own_job
from airlock.ids import (
    FineTunedRef,
    NoisedRef,
    is_fine_tuned,
    is_noised,
    parse_fine_tuned_id,
    parse_model_id,
    parse_noised_id,
)
from airlock.leak.keys import watermark_key
from airlock.mitigations import MitigatedStream, VariantPipeline, Verdict
from airlock.registry.service import RegistryCache, ResolvedVariant
from airlock.serving.pipelines import PipelineCache


class ServingState(Protocol):
    """What the sampling path needs of the process-wide state (the app's ``GatewayState`` has it)."""

    settings: Settings
    db: Database
    registry: RegistryCache
    pipelines: PipelineCache
    limiter: RateLimiter


@dataclass
class Target:
    """The authorized variant a request will be served by."""

    public_id: str
    backend: VariantPipeline


@dataclass(frozen=True)
class ResolvedTarget:
    """A model id resolved to the variant that serves it, authorised for the caller's grant."""

    variant: ResolvedVariant
    fine_tune: FineTunedRef | None
    """The fine-tuning job whose adapter the variant runs, for an ``ft:`` id."""
    noise: NoisedRef | None = None
    """The noise on the variant's weights, for a ``noise:`` id."""
    noise_expires_at: datetime | None = None


async def resolve_target(
    state: ServingState, principal: Principal, model_id: str, scopes: list[str], audit: AuditContext
) -> ResolvedTarget:
    """Turn any model id (``m/v``, ``m@version/v``, ``ft:…``) into a target the caller's grant covers.

    The one resolver of the gateway: a fine-tuned model is visible only to keys of the grant that
    trained it, once its job has succeeded (404 otherwise, as for a model that does not exist), and
    so is each training checkpoint the job listed. Authorization failures are 403s, audited by the
    caller.
    """
    audit.model = model_id
    if is_noised(model_id):
        return await _resolve_noised(state, principal, parse_noised_id(model_id), scopes, audit)
    fine_tune = parse_fine_tuned_id(model_id) if is_fine_tuned(model_id) else None
    ref = fine_tune.base if fine_tune is not None else parse_model_id(model_id)
    audit.variant = ref.variant
    audit.scope = ",".join(scopes)
    if fine_tune is None:
        resolved = state.registry.peek(ref)
        if resolved is None:
            resolved = await run_in_threadpool(state.registry.get, state.db.sessions, ref)
    else:
        job_id, own_id, step = fine_tune.job_id, fine_tune.model_id, fine_tune.checkpoint_step
        home = state.settings.artifacts_dir

        def _lookup() -> ResolvedVariant:
            with state.db.session() as session:
                job = ft_get_own_job(session, principal, job_id)
                if job.status != "succeeded" or job.params.get("fine_tuned_model") != own_id:
                    raise NotFoundError(f"model {model_id!r} does not exist", code="model_not_found")
                if step is not None:
                    saved = {int(c["step"]) for c in (job.result or {}).get("checkpoints") or []}
                    adapter = AdapterStore.of_home(home).checkpoint_path(job_id, step)
                    if step not in saved or not (adapter / "adapter_config.json").is_file():
                        raise NotFoundError(f"model {model_id!r} does not exist", code="model_not_found")
            return state.registry.get(state.db.sessions, ref)

        resolved = await run_in_threadpool(_lookup)
        audit.detail["fine_tuning_job"] = job_id
        if step is not None:
            audit.detail["checkpoint_step"] = step
    audit.version_id = resolved.version_id
    authorize(principal, resolved, scopes)
    return ResolvedTarget(resolved, fine_tune)


async def _resolve_noised(
    state: ServingState, principal: Principal, noise: NoisedRef, scopes: list[str], audit: AuditContext
) -> ResolvedTarget:
    """Resolve a noise-injected variant: a live variant of the caller's grant's own job (404 otherwise)."""
    audit.variant = noise.base.variant
    audit.scope = ",".join(scopes)

    def _lookup() -> tuple[ResolvedVariant, datetime]:
        with state.db.session() as session:
            expires_at = noised_variant(session, principal, noise)
        return state.registry.get(state.db.sessions, noise.base), expires_at

    resolved, expires_at = await run_in_threadpool(_lookup)
    audit.detail["noise_injection_job"] = noise.job_id
    audit.detail["noise"] = {"sigma": noise.sigma, "seed": noise.seed}
    audit.version_id = resolved.version_id
    authorize(principal, resolved, scopes)  # the base variant must still be granted
    return ResolvedTarget(resolved, None, noise, expires_at)


async def prepare(
    state: ServingState,
    principal: Principal,
    audit: AuditContext,
    request: ChatCompletionRequest | CompletionRequest,
    *,
    scope: str = "sample",
) -> Target:
    """Authorize the request against the grant, enforce quotas and return its pipeline.

    ``scope`` is the capability the request exercises: ``sample`` for the OpenAI routes, ``redteam``
    for a red-teaming session's turn (same pipeline, same quotas, another grant scope).
    """
    scopes = [scope] + (["logprobs"] if request.wants_logprobs() else [])
    target = await resolve_target(state, principal, request.model, scopes, audit)
    resolved = target.variant
    check_output_budget(request, resolved)
    terms = _sampling_terms(principal.grant)
    if terms.quota_total_tokens is not None:
        # The principal may come from the authentication cache: read the usage counter itself.
        used = await run_in_threadpool(_tokens_used, state.db, principal.grant_id)
        check_token_quota(principal.grant, used)
    if terms.quota_requests_per_minute:
        await state.limiter.hit(principal.grant_id, terms.quota_requests_per_minute)
    spec = VariantRuntimeSpec.of(resolved)
    if target.noise is not None and target.noise_expires_at is not None:
        backend = await state.pipelines.noise_pipeline(spec, target.noise, target.noise_expires_at)
    elif target.fine_tune is None:
        backend = await state.pipelines.pipeline(spec)
    else:
        backend = await adapter_pipeline(state, spec, target.fine_tune)
    backend.check_request(request)
    if request.wants_logprobs() and not backend.supports_logprobs:
        raise InvalidRequestError(
            f"variant {resolved.variant_name!r} cannot return log-probabilities", param="logprobs"
        )
    if isinstance(request, CompletionRequest) and request.echo and not backend.supports_echo:
        raise InvalidRequestError(f"variant {resolved.variant_name!r} does not support echo", param="echo")
    if request.temperature > 0 and terms.watermark:
        keys = _WATERMARK_KEYS.setdefault(state.db, {})
        key = keys.get(principal.grant_id)
        if key is None:
            key = await run_in_threadpool(_grant_watermark_key, state, principal.grant_id)
            if len(keys) >= 10_000:
                keys.clear()
            keys[principal.grant_id] = key
        request.set_watermark_key(key)
    return Target(public_id=request.model, backend=backend)


_TERMS: dict[int, tuple[Any, SamplingTerms]] = {}


def _sampling_terms(grant: Grant) -> SamplingTerms:
    """Return a grant's sampling terms, parsed once per stored terms object.

    A principal from the authentication cache brings the same grant, and the same terms dict, on
    every request; the entry holds that dict, so its id cannot be reused while it is there. A
    grant read afresh (or changed) brings another dict and is parsed again.
    """
    stored = grant.terms
    memo = _TERMS.get(id(stored))
    if memo is not None and memo[0] is stored:
        return memo[1]
    terms = terms_of(grant, SamplingTerms)
    if len(_TERMS) >= 1024:
        _TERMS.clear()
    _TERMS[id(stored)] = (stored, terms)
    return terms


async def adapter_pipeline(state: ServingState, spec: VariantRuntimeSpec, fine_tune: FineTunedRef) -> VariantPipeline:
    """Return the variant's pipeline running a fine-tuned model's adapter (or one of its checkpoints')."""
    store = AdapterStore.of_home(state.settings.artifacts_dir)
    step = fine_tune.checkpoint_step
    if step is None:
        return await state.pipelines.adapter_pipeline(spec, fine_tune.job_id, store.path(fine_tune.job_id))
    name = f"{fine_tune.job_id}-step-{step}"
    return await state.pipelines.adapter_pipeline(spec, name, store.checkpoint_path(fine_tune.job_id, step))


def _tokens_used(db: Database, grant_id: str) -> int:
    with db.session() as session:
        return tokens_used(session, grant_id)


# A grant's watermark key is an HMAC of its id under the database's grant seal key, which is fixed
# for the process's life: derived once per grant and database, not in a thread on every request.
_WATERMARK_KEYS: weakref.WeakKeyDictionary[Database, dict[str, bytes]] = weakref.WeakKeyDictionary()


def _grant_watermark_key(state: ServingState, grant_id: str) -> bytes:
    """Return the grant's watermark key (derived from the lab secret, applied where Airlock samples)."""
    with state.db.session() as session:
        return watermark_key(session, grant_id)


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


def account(audit: AuditContext, usage: Usage | None, verdicts: list[Verdict]) -> None:
    """Put a call's token usage and mitigation verdicts into its audit event."""
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
    account(audit, result.usage, screened.verdicts)
    return result


async def complete(target: Target, request: CompletionRequest, audit: AuditContext) -> Completion:
    """Serve a non-streaming text completion."""
    screened = await target.backend.screened_complete(request)
    result = screened.result
    result.model = target.public_id
    account(audit, result.usage, screened.verdicts)
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
        account(audit, usage, screened.verdicts)
    yield "data: [DONE]\n\n"
