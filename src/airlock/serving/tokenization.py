"""vLLM's tokenizer endpoints on a granted variant: which variant's tokenizer a request means, and its backend.

A request names a model id like any sampling request; lm-eval's remote tokenizer names none, so
without one the grant's variants are used when they all share one tokenizer (the usual case:
variants of one set of weights), and the caller is asked to name one otherwise. Tokenization
costs no model time: it is audited but not counted against request or token quotas.
"""

from __future__ import annotations

import json

from fastapi.concurrency import run_in_threadpool

from airlock.access.middleware import AuditContext
from airlock.access.service import Principal, granted_model_ids
from airlock.backends.base import ModelBackend
from airlock.backends.pool import VariantRuntimeSpec
from airlock.errors import InvalidRequestError, PermissionDeniedError
from airlock.ids import parse_model_id
from airlock.registry.service import ResolvedVariant
from airlock.serving.service import ServingState, resolve_target

__all__ = ["tokenizer_backend"]

SCOPES = ["sample"]


def _tokenizer_source(variant: ResolvedVariant) -> str:
    """Identify the tokenizer a variant's backend uses: variants with equal sources tokenize alike."""
    config = variant.backend_config
    if variant.backend == "local":
        return json.dumps(["local", config.get("model")])
    return json.dumps([variant.backend, config.get("base_url"), config.get("model")])


async def _default_model_id(state: ServingState, principal: Principal) -> str:
    """Return the model id a request without one means: any granted variant, when they all share a tokenizer."""

    def _ids() -> list[str]:
        with state.db.session() as session:
            return granted_model_ids(session, principal)

    ids = await run_in_threadpool(_ids)
    if not ids:
        raise PermissionDeniedError("your grant covers no model you may sample", code="scope_not_granted")
    sources: dict[str, str] = {}
    for model_id in ids:
        variant = await run_in_threadpool(state.registry.get, state.db.sessions, parse_model_id(model_id))
        sources.setdefault(_tokenizer_source(variant), model_id)
    if len(sources) > 1:
        raise InvalidRequestError(
            f"your grant's variants use different tokenizers; name one in `model` (one of {', '.join(ids)})",
            code="model_required",
            param="model",
        )
    return ids[0]


async def tokenizer_backend(
    state: ServingState, principal: Principal, audit: AuditContext, model: str | None
) -> ModelBackend:
    """Return the raw backend whose tokenizer serves ``model`` (a granted variant; ``ft:`` ids use their base's)."""
    model_id = model if model else await _default_model_id(state, principal)
    target = await resolve_target(state, principal, model_id, SCOPES, audit)
    # Mitigations act on what is generated; a tokenizer is the variant's weights', so the raw backend answers.
    return await state.pipelines.pool.backend(VariantRuntimeSpec.of(target.variant))
