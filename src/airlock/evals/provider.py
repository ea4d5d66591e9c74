"""Inspect model provider ``airlock/<model>/<variant>``: evaluate an Airlock-served variant natively.

Usage::

    export AIRLOCK_BASE_URL=https://airlock.example/v1 AIRLOCK_API_KEY=ak-...
    inspect eval task.py --model airlock/smollm2-135m/helpful-only

The model name is ``<model>/<variant>`` or ``<model>@<version>/<variant>``; the ``base_url`` and
``api_key`` arguments (``--model-base-url``, ``-M api_key=...``) override the environment.

The provider is Inspect's OpenAI-compatible chat-completions provider (never the Responses API,
which Airlock does not serve), so messages, log-probabilities and tool calls map exactly as for
``openai-api/...``. What it adds:

* **Provenance.** When the model is created it reads ``GET {base}/airlock/models/{id}`` (version,
  version hash, stage, variant, grant id, mitigations with their stances) and
  ``GET {base}/airlock/grant``. A key that cannot use the variant fails here, before any sample
  runs, with Airlock's reason. The record is attached to **every model output** as
  ``ModelOutput.metadata["airlock"]``, so the ``.eval`` log holds it in each sample's
  ``output.metadata["airlock"]`` and in each model event; :func:`provenance_from_log` reads it
  back (and refuses a log whose samples disagree). Inspect offers providers no hook into the
  log header (``eval.model_args`` and ``eval.metadata`` come from the caller), so the record
  travels with the outputs it describes.
* **Version pinning.** Without an explicit ``@<version>``, requests go to
  ``<model>@<version>/<variant>`` for the version the provenance names, so a version deployed
  mid-eval cannot serve some samples while the log names another (``-M pin_version=false``
  turns this off).
* **Retries.** Inspect's retry loop is the only one (the SDK's own retries are off, so
  ``--max-retries`` means what it says). A 429 from the requests-per-minute quota is retried as a
  rate limit, after the ``Retry-After`` the gateway sends; an exhausted token quota (429
  ``insufficient_quota``) and 400/401/403 are not retried. A 403 during the eval (a revoked grant)
  fails the sample with Airlock's reason.
* **Honest tool specs.** Tools are sent with ``strict: false`` unless ``-M strict_tools=true``:
  Airlock's local backend does not constrain generation to the schema.
"""

from __future__ import annotations

import email.utils
import os
import random
import time
from datetime import UTC, datetime
from typing import Any, Literal, cast
from urllib.parse import quote

import httpx
from inspect_ai._util.error import PrerequisiteError
from inspect_ai.log import EvalLog
from inspect_ai.model import ChatMessage, GenerateConfig, ModelOutput, modelapi
from inspect_ai.model._model import ModelAPI, RetryDecision
from inspect_ai.model._model_call import ModelCall
from inspect_ai.model._providers.openai_compatible import OpenAICompatibleAPI
from inspect_ai.tool import ToolChoice, ToolInfo
from openai import APIStatusError
from tenacity import RetryCallState
from tenacity.wait import wait_base, wait_exponential_jitter
from typing_extensions import override

from airlock.errors import InvalidRequestError
from airlock.ids import ModelRef, is_fine_tuned, is_noised, parse_fine_tuned_id, parse_model_id, parse_noised_id

__all__ = [
    "PROVENANCE_KEY",
    "AirlockAPI",
    "AirlockProviderError",
    "RetryAfterWait",
    "fetch_provenance",
    "provenance_from_log",
    "retry_after_seconds",
]

#: Key of the provenance record in ``ModelOutput.metadata``.
PROVENANCE_KEY = "airlock"
BASE_URL_VAR = "AIRLOCK_BASE_URL"
API_KEY_VAR = "AIRLOCK_API_KEY"

# Waits longer than this are not worth honouring verbatim (a misconfigured quota); fall back to backoff.
_MAX_RETRY_AFTER_S = 600.0


class AirlockProviderError(PrerequisiteError):
    """Airlock refused or could not serve the provider's set-up (shown by Inspect without a traceback)."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.args = (message,)
        #: The HTTP status Airlock answered with, when the error came from one.
        self.status_code = status_code

    def __str__(self) -> str:
        return str(self.message)


# ---------------------------------------------------------------- provenance


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return str(body)[:300]


def fetch_provenance(base_url: str, api_key: str, model_id: str, *, timeout: float = 30.0) -> dict[str, Any]:
    """Return the provenance record of ``model_id``: the variant's and the grant's descriptions."""
    headers = {"Authorization": f"Bearer {api_key}"}
    base = base_url.rstrip("/")
    try:
        with httpx.Client(timeout=timeout, headers=headers) as client:
            variant = client.get(f"{base}/airlock/models/{quote(model_id, safe='/@')}")
            grant = client.get(f"{base}/airlock/grant") if variant.status_code == 200 else variant
    except httpx.HTTPError as exc:
        raise AirlockProviderError(f"cannot reach Airlock at {base}: {type(exc).__name__}: {exc}") from exc
    for response in (variant, grant):
        if response.status_code == 200:
            continue
        reason = _error_message(response)
        status = response.status_code
        if status == 401:
            raise AirlockProviderError(f"Airlock rejected the API key ({API_KEY_VAR}): {reason}", status_code=status)
        if status == 403:
            raise AirlockProviderError(f"Airlock denied access to {model_id!r}: {reason}", status_code=status)
        if status == 404:
            raise AirlockProviderError(f"Airlock does not serve {model_id!r}: {reason}", status_code=status)
        raise AirlockProviderError(
            f"Airlock answered {status} for {response.request.url}: {reason}", status_code=status
        )
    return {
        "model_id": model_id,
        "base_url": base,
        "variant": variant.json(),
        "grant": grant.json(),
        "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def provenance_from_log(log: EvalLog) -> dict[str, Any]:
    """Return the Airlock provenance recorded in ``log``: from its header when present, else from its samples.

    The result is the record the provider attached to the outputs (``model_id``, ``base_url``,
    ``variant``: ``{id, model, version, version_hash, stage, variant, grant_id, mitigations}``,
    ``grant`` and ``fetched_at``), plus ``served_model_id`` (the id requests were sent to).
    Raises ``ValueError`` when the log has no samples or no Airlock outputs, or when samples
    name different grants, versions or variants.
    """
    # `airlock eval run` also writes the record into the log header (eval-level metadata, keyed by the
    # log's model), which survives --no-log-samples and header-only reads.
    header = (log.eval.metadata or {}).get(PROVENANCE_KEY)
    if isinstance(header, dict) and isinstance(header.get(log.eval.model), dict):
        in_header: dict[str, Any] = header[log.eval.model]
        return in_header
    if not log.samples:
        raise ValueError("the eval log has no samples (read it with header_only=False); provenance is per output")
    found: list[dict[str, Any]] = []
    for sample in log.samples:
        record = (sample.output.metadata or {}).get(PROVENANCE_KEY) if sample.output else None
        if record is None:
            # e.g. an agent whose final output came from another model: look at the model calls.
            for event in sample.events:
                output = getattr(event, "output", None)
                if getattr(event, "event", None) == "model" and isinstance(output, ModelOutput):
                    record = (output.metadata or {}).get(PROVENANCE_KEY)
                    if record is not None:
                        break
        if isinstance(record, dict):
            found.append(record)
    if not found:
        raise ValueError("the eval log holds no Airlock provenance (was the model airlock/<model>/<variant>?)")

    def identity(record: dict[str, Any]) -> tuple[Any, ...]:
        variant = record.get("variant") or {}
        return (variant.get("grant_id"), variant.get("version_hash"), variant.get("variant"), variant.get("model"))

    distinct = {identity(r) for r in found}
    if len(distinct) > 1:
        raise ValueError(f"the eval log's samples name different Airlock targets: {sorted(map(str, distinct))}")
    return found[0]


# ---------------------------------------------------------------- retries


def retry_after_seconds(ex: BaseException | None) -> float | None:
    """Return the wait an HTTP error's ``Retry-After`` (or ``retry-after-ms``) header asks for."""
    response = getattr(ex, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class RetryAfterWait(wait_base):
    """Tenacity wait: the server's ``Retry-After`` (plus a little jitter) when given, else ``fallback``."""

    def __init__(self, fallback: wait_base | None = None, max_wait: float = _MAX_RETRY_AFTER_S) -> None:
        # Inspect's own default backoff, used whenever the server names no wait.
        self.fallback = fallback or wait_exponential_jitter(initial=3, max=30 * 60, jitter=3)
        self.max_wait = max_wait

    def __call__(self, retry_state: RetryCallState) -> float:
        """Return the seconds to sleep before the next attempt."""
        outcome = retry_state.outcome
        ex = outcome.exception() if outcome is not None and outcome.failed else None
        after = retry_after_seconds(ex)
        if after is None or after > self.max_wait:
            return float(self.fallback(retry_state))
        # Samples rate-limited together would otherwise all retry at the same instant.
        return after + random.uniform(0.0, min(1.0, 0.1 * after + 0.1))


def _error_message_of(ex: APIStatusError) -> str:
    """Return Airlock's own message from an OpenAI-shaped error body."""
    body = ex.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    return ex.message


def _error_code(ex: APIStatusError) -> str | None:
    body = ex.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("code"), str):
            return str(error["code"])
    return ex.code if isinstance(ex.code, str) else None


# ---------------------------------------------------------------- the provider


class AirlockAPI(OpenAICompatibleAPI):
    """Inspect provider for Airlock variants (``airlock/<model>/<variant>``); see the module docstring."""

    def __init__(
        self,
        model_name: str,
        base_url: str | None = None,
        api_key: str | None = None,
        config: GenerateConfig = GenerateConfig(),  # noqa: B008 (Inspect's signature)
        pin_version: bool = True,
        strict_tools: bool = False,
        emulate_tools: bool = False,
        stream: bool | Literal["auto"] | None = None,
        client_timeout: float | None = None,
        **model_args: Any,
    ) -> None:
        # The server's own grammar (airlock.ids): fine-tuned and noised ids are pinned by construction.
        try:
            pinned = is_fine_tuned(model_name) or is_noised(model_name)
            ref = None if pinned else parse_model_id(model_name)
            if is_fine_tuned(model_name):
                parse_fine_tuned_id(model_name)
            elif is_noised(model_name):
                parse_noised_id(model_name)
        except InvalidRequestError:
            raise ValueError(
                f"Airlock model names are airlock/<model>/<variant>, airlock/<model>@<version>/<variant>, "
                f"airlock/ft:... or airlock/noise:..., not airlock/{model_name}"
            ) from None
        if model_args.pop("responses_api", False):
            raise ValueError("Airlock serves chat completions, not the Responses API; drop responses_api")
        base_url = base_url or os.environ.get(BASE_URL_VAR)
        api_key = api_key or os.environ.get(API_KEY_VAR)
        missing = [var for var, value in ((BASE_URL_VAR, base_url), (API_KEY_VAR, api_key)) if not value]
        if missing or base_url is None or api_key is None:
            raise AirlockProviderError(
                f"the airlock provider needs {' and '.join(missing)} (or the base_url / api_key model arguments)"
            )
        base_url = base_url.rstrip("/")
        #: The provenance record attached to every output (see `provenance_from_log`).
        self.provenance: dict[str, Any] = fetch_provenance(base_url, api_key, model_name)
        served = model_name
        if pin_version and ref is not None and ref.version is None:
            version = self.provenance["variant"]["version"]
            served = str(ModelRef(model=ref.model, version=version, variant=ref.variant))
        self.provenance["served_model_id"] = served
        self._served_model_id = served
        # Inspect's retry loop is the only one: the SDK would otherwise retry 429s on its own first.
        model_args.setdefault("max_retries", 0)
        super().__init__(
            model_name=model_name,
            base_url=base_url,
            api_key=api_key,
            config=config,
            service="Airlock",
            emulate_tools=emulate_tools,
            responses_api=False,
            stream=stream,
            strict_tools=strict_tools,
            client_timeout=client_timeout,
            **model_args,
        )

    @override
    def service_model_name(self) -> str:
        """Return the model id requests are sent with (version-pinned unless disabled)."""
        return self._served_model_id

    @override
    async def generate(
        self,
        input: list[ChatMessage],
        tools: list[ToolInfo],
        tool_choice: ToolChoice,
        config: GenerateConfig,
    ) -> ModelOutput | tuple[ModelOutput | Exception, ModelCall]:
        """Generate through the gateway and attach the provenance record to the output."""
        try:
            result = await super().generate(input, tools, tool_choice, config)
        except APIStatusError as ex:
            if ex.status_code == 401:  # e.g. the grant was revoked mid-eval
                raise AirlockProviderError(
                    f"Airlock rejected the API key for {self.model_name!r}: {_error_message_of(ex)}", status_code=401
                ) from ex
            if ex.status_code == 429 and _error_code(ex) == "insufficient_quota":
                # Permanent until the lab raises the quota: fail now rather than retry forever.
                raise AirlockProviderError(
                    f"Airlock token quota exhausted for {self.model_name!r}: {_error_message_of(ex)}", status_code=429
                ) from ex
            raise
        output = result[0] if isinstance(result, tuple) else result
        if isinstance(output, ModelOutput):
            output.metadata = {**(output.metadata or {}), PROVENANCE_KEY: self.provenance}
        return result

    @override
    def handle_bad_request(self, ex: APIStatusError) -> ModelOutput | Exception:
        """Turn a 403 (grant expired or narrowed mid-eval) into a clear, non-retried error."""
        if ex.status_code == 403:
            # Raised, not returned: a returned error reaches the log wrapped in the whole request dump.
            raise AirlockProviderError(
                f"Airlock denied access to {self.model_name!r}: {_error_message_of(ex)}", status_code=403
            )
        return super().handle_bad_request(ex)

    @override
    def is_auth_failure(self, ex: Exception) -> bool:
        """Recognise a rejected key (so Inspect's credential-refresh hooks still get their chance)."""
        if isinstance(ex, AirlockProviderError):
            return ex.status_code == 401
        return super().is_auth_failure(ex)

    @override
    def should_retry(self, ex: BaseException) -> bool | RetryDecision:
        """Retry 429 (rate limits) and transient failures; never 400/401/403 or an exhausted quota."""
        if isinstance(ex, AirlockProviderError):
            return RetryDecision.no()
        if isinstance(ex, APIStatusError) and ex.status_code == 429 and _error_code(ex) == "insufficient_quota":
            return RetryDecision.no()
        return super().should_retry(ex)

    @override
    def retry_wait(self) -> wait_base:
        """Wait as long as Airlock's ``Retry-After`` says, else Inspect's exponential backoff."""
        return RetryAfterWait()


@modelapi(name="airlock")
def airlock() -> type[ModelAPI]:
    """Register the ``airlock/<model>/<variant>`` provider with Inspect."""
    return cast(type[ModelAPI], AirlockAPI)
