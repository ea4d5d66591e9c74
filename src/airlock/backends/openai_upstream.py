"""A backend that forwards requests to an OpenAI-compatible upstream (vLLM, TGI, a lab's API).

The upstream is the operator's model server: Airlock authenticates to it with the operator's
key (``api_key`` or ``api_key_env``), never with the evaluator's. The client is ``aiohttp``
with one pooled session per backend; ``httpx`` measured about 8x slower at 32 concurrent
requests on the development machines (DESIGN.md).

Failures map onto Airlock's error tree: unreachable or timed-out upstream -> 503; upstream
429 -> 429; upstream 400/422 -> 400 with the upstream's message (the evaluator's request was
bad); upstream 401/403/404 and 5xx or unparseable bodies -> 502 (the operator's setup or
server is at fault, and its details are logged, not shown to the evaluator).

Request fields Airlock does not model (vLLM's ``top_k``, ``min_p``, ``guided_json``,
``structured_outputs``, ...) are forwarded untouched. Airlock keeps control of what it must: the
``model`` (rewritten), ``stream`` and ``stream_options`` (set by Airlock), the token budget (checked
against the variant's cap before this backend runs), log-probabilities (the scope check), and the
prompt format the mitigations rely on: the fields in ``CONTROLLED_FIELDS`` are refused with a 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import random
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, NoReturn, TypeVar
from urllib.parse import urlsplit

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from airlock.backends import http1, tokenization
from airlock.backends.base import ModelBackend
from airlock.backends.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    SamplingFields,
    Usage,
)
from airlock.errors import (
    AirlockError,
    BackendError,
    BackendUnavailableError,
    ConfigError,
    InvalidRequestError,
    RateLimitError,
)

logger = logging.getLogger(__name__)
AnswerT = TypeVar("AnswerT", ChatCompletion, Completion)

_FINISH_REASONS = frozenset({"stop", "length", "content_filter", "tool_calls"})
# Older and non-OpenAI servers use other finish reasons; map them onto the wire model's set.
_FINISH_ALIASES = {"function_call": "tool_calls", "eos_token": "stop", "eos": "stop", "max_tokens": "length"}
# Error text copied from upstream bodies into logs or 4xx messages is clipped to this length.
_MAX_ERROR_CHARS = 500
# SSE lines are read whole; a chunk with many top_logprobs can exceed aiohttp's 256 KiB default.
_READ_BUFSIZE = 1 << 20


#: Unmodelled fields an upstream would act on that Airlock must control: refused, with the reason.
CONTROLLED_FIELDS: dict[str, str] = {
    "chat_template": "the prompt format is the lab's: a client template could drop the variant's system prompt",
    "chat_template_kwargs": "the prompt format is the lab's",
    "prompt_logprobs": "prompt log-probabilities come only from /v1/completions with echo and logprobs",
    "return_token_ids": "token ids of the answer are not relayed; use logprobs",
    "max_new_tokens": "the token budget is max_tokens or max_completion_tokens (checked against the variant's cap)",
    "ignore_eos": "the token budget is checked against the variant's cap; generation ends at end-of-sequence",
    "kv_transfer_params": "the upstream's cache transfer is the lab's to configure",
}


class UpstreamConfig(BaseModel):
    """Manifest configuration of an ``openai_upstream`` backend."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(description="Upstream API root including /v1, e.g. http://127.0.0.1:9000/v1.")
    model: str = Field(min_length=1, description="Model id the upstream serves.")
    api_key: SecretStr | None = Field(default=None, description="Operator's upstream key (prefer api_key_env).")
    api_key_env: str | None = Field(default=None, min_length=1, description="Env var holding the upstream key.")
    timeout_s: float = Field(default=120.0, gt=0, description="Whole-request timeout; idle timeout for streams.")
    connect_timeout_s: float = Field(default=10.0, gt=0)
    max_connections: int = Field(default=64, ge=1)
    max_retries: int = Field(default=2, ge=0, le=10, description="Retries of non-streaming calls on connect/503.")
    supports_logprobs: bool = True
    supports_echo: bool | None = Field(
        default=None, description="Whether echo returns prompt log-probabilities (default: true for vLLM)."
    )
    extra_headers: dict[str, str] = Field(default_factory=dict)
    engine: Literal["openai", "vllm"] = Field(
        default="openai",
        description="`vllm`: the server is vLLM (tokenizer endpoints, prompt_logprobs and runtime LoRA adapters).",
    )
    weights: str | None = Field(
        default=None,
        min_length=1,
        description="The checkpoint the server loads, as the lab's workers read it (fine-tuning and interp).",
    )
    worker_device: str | None = Field(
        default=None, description="Device of the lab-side model worker that holds `weights` (default cpu)."
    )
    worker_dtype: str | None = Field(
        default=None, description="Dtype of that worker's weights: float32, bfloat16, float16 or auto."
    )
    adapter_root: str | None = Field(
        default=None,
        min_length=1,
        description="Airlock's fine-tuning directory (`<home>/finetune`) as the vLLM server mounts it; "
        "default: the same path as on the gateway.",
    )

    @field_validator("base_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL such as http://127.0.0.1:9000/v1")
        return value.rstrip("/")

    @field_validator("extra_headers")
    @classmethod
    def _no_auth_header(cls, value: dict[str, str]) -> dict[str, str]:
        if any(k.lower() == "authorization" for k in value):
            raise ValueError("set the upstream key with api_key or api_key_env, not an Authorization header")
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> UpstreamConfig:
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("give api_key or api_key_env, not both")
        return self

    @model_validator(mode="after")
    def _vllm_only(self) -> UpstreamConfig:
        if self.engine != "vllm":
            for name in ("weights", "adapter_root", "worker_device", "worker_dtype"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} needs engine: vllm")
        elif not self.base_url.endswith("/v1"):
            # vLLM's tokenizer endpoints live beside /v1, at the server's root.
            raise ValueError("with engine: vllm, base_url must end in /v1 (e.g. http://10.0.0.5:8000/v1)")
        return self

    @property
    def echo_supported(self) -> bool:
        """Whether ``echo`` with log-probabilities returns the prompt's (vLLM does)."""
        return self.supports_echo if self.supports_echo is not None else self.engine == "vllm"

    @property
    def server_root(self) -> str:
        """The server's root URL (``base_url`` without ``/v1``), where vLLM serves ``/tokenize``."""
        return self.base_url.removesuffix("/v1")


class OpenAIUpstreamBackend(ModelBackend):
    """Forwards chat and text completions to an OpenAI-compatible server with the operator's key."""

    kind = "openai_upstream"
    forwards_unknown_fields = True
    field_notes: ClassVar[Mapping[str, str]] = {
        "model": "rewritten to the upstream's model id",
        "messages": "forwarded (after the variant's mitigations)",
        "prompt": "forwarded",
        "stream": "set by Airlock",
        "stream_options": "set by Airlock (usage is always requested; relayed as asked)",
        "max_tokens": "forwarded (capped by the variant)",
        "max_completion_tokens": "forwarded (capped by the variant)",
        "logprobs": "forwarded when the manifest says the upstream supports them (needs the `logprobs` scope)",
        "top_logprobs": "forwarded (with `logprobs`)",
        "echo": "forwarded when the manifest sets `supports_echo`",
    }

    def check_request(self, request: SamplingFields) -> None:
        """Refuse the unmodelled fields Airlock must control (``CONTROLLED_FIELDS``); forward the rest."""
        for name in request.extra_fields():
            reason = CONTROLLED_FIELDS.get(name)
            if reason is not None:
                raise InvalidRequestError(
                    f"{name!r} is not accepted: {reason}", code="unsupported_parameter", param=name
                )

    def __init__(self, config: UpstreamConfig, api_key: str | None = None) -> None:
        self.config = config
        self.base_url = config.base_url
        self.model = config.model
        self._api_key = api_key or None
        # Capabilities depend on the upstream, so they are per instance (ModelBackend declares
        # them as class variables for the common case of fixed capabilities).
        self.supports_logprobs = config.supports_logprobs  # type: ignore[misc]
        self.supports_echo = config.echo_supported  # type: ignore[misc]
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        # Non-streaming calls go through the lean keep-alive client; streams through aiohttp.
        self._http: http1.Http1Client | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None
        # Airlock's adapter name -> the opaque name the server knows it by; names and paths to keep hidden.
        self._adapters: dict[str, str] = {}
        self._adapter_paths: dict[str, Path] = {}
        self._adapter_secrets: set[str] = set()
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_s, sock_connect=config.connect_timeout_s)
        # Streams may legitimately run for minutes; bound the silence between chunks instead.
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout_s, sock_read=config.timeout_s
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> OpenAIUpstreamBackend:
        """Build the backend from its manifest config; raise ``ConfigError`` when it is invalid."""
        try:
            parsed = UpstreamConfig.model_validate(dict(config))
        except ValidationError as exc:
            # Only locations and messages: pydantic's full text would echo input values (the key).
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
            )
            raise ConfigError(f"openai_upstream backend: invalid config: {problems}") from None
        api_key: str | None = None
        if parsed.api_key is not None:
            api_key = parsed.api_key.get_secret_value()
        elif parsed.api_key_env is not None:
            api_key = os.environ.get(parsed.api_key_env)
            if not api_key:
                raise ConfigError(
                    f"openai_upstream backend: environment variable {parsed.api_key_env!r} (api_key_env) is not set"
                )
        return cls(parsed, api_key)

    def __repr__(self) -> str:
        return f"OpenAIUpstreamBackend(base_url={self.base_url!r}, model={self.model!r})"

    # ------------------------------------------------------------ lifecycle

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json", **self.config.extra_headers}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _get_session(self) -> aiohttp.ClientSession:
        # Created lazily too, because a backend may be used without start() (tests, CLI).
        loop = asyncio.get_running_loop()
        if self._session is not None and not self._session.closed and self._session_loop is not loop:
            # Started on another event loop (e.g. ``asyncio.run(backend.start())``): that session's
            # connections belong to the old loop and cannot be used or closed from this one.
            logger.debug("upstream %s: event loop changed, opening a new HTTP session", self.base_url)
            self._session.detach()
            self._session = None
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.config.max_connections, limit_per_host=0)
            self._session = aiohttp.ClientSession(
                connector=connector, headers=self._headers(), read_bufsize=_READ_BUFSIZE
            )
            self._session_loop = loop
        return self._session

    def _client(self) -> http1.Http1Client:
        # Connections belong to the event loop that opened them, as the aiohttp session's do.
        loop = asyncio.get_running_loop()
        if self._http is None or self._http_loop is not loop:
            # Another loop's connections can be neither used nor closed from this one: they are dropped.
            headers = {"User-Agent": "airlock", **self._headers()}
            self._http = http1.Http1Client(
                self.base_url,
                headers,
                limit=self.config.max_connections,
                connect_timeout_s=self.config.connect_timeout_s,
            )
            self._http_loop = loop
        return self._http

    async def start(self) -> None:
        """Open the pooled HTTP session."""
        self._get_session()

    async def aclose(self) -> None:
        """Close the HTTP session and its connections."""
        client, self._http = self._http, None
        if client is not None and self._http_loop is asyncio.get_running_loop():
            client.close()
        session, self._session = self._session, None
        if session is None or session.closed:
            return
        if self._session_loop is asyncio.get_running_loop():
            await session.close()
        else:
            session.detach()

    # ------------------------------------------------------------ helpers

    def _hidden(self) -> list[str]:
        """Strings no evaluator may see: the server's address and the names and paths of adapters loaded on it."""
        return [self.config.server_root, urlsplit(self.base_url).netloc, *self._adapter_secrets]

    def _redact(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "[redacted]")
        for secret in sorted(self._hidden(), key=len, reverse=True):
            if secret:
                text = text.replace(secret, "[hidden]")
        return text[:_MAX_ERROR_CHARS]

    def _payload(self, request: SamplingFields, *, stream: bool) -> bytes:
        # Only the fields the client set: the upstream applies its own defaults for the rest.
        # Unmodelled fields ride along as the client sent them (``check_request`` refused controlled ones).
        body = request.model_dump(mode="json", exclude_unset=True, by_alias=True)
        body["model"] = self.model
        body["stream"] = stream
        if stream:
            body["stream_options"] = {"include_usage": True}
        else:
            body.pop("stream_options", None)
        return json.dumps(body).encode()

    def _check_chat(self, request: ChatCompletionRequest) -> None:
        if request.wants_logprobs() and not self.supports_logprobs:
            raise InvalidRequestError("this model does not return log-probabilities", param="logprobs")

    def _check_completion(self, request: CompletionRequest) -> None:
        if request.wants_logprobs() and not self.supports_logprobs:
            raise InvalidRequestError("this model does not return log-probabilities", param="logprobs")
        if request.echo and request.wants_logprobs() and not self.supports_echo:
            raise InvalidRequestError("this model does not return prompt log-probabilities (echo)", param="echo")

    def _error_message(self, raw: bytes) -> tuple[str, str | None]:
        """Return the upstream's error message and param from an error body (OpenAI or FastAPI style)."""
        text = raw.decode("utf-8", errors="replace")
        try:
            data = json.loads(text)
        except ValueError:
            return self._redact(text.strip()) or "no details", None
        if isinstance(data, dict):
            error = data.get("error")
            if isinstance(error, dict) and error.get("message"):
                param = error.get("param")
                return self._redact(str(error["message"])), str(param) if isinstance(param, str) else None
            if isinstance(error, str):
                return self._redact(error), None
            if "detail" in data:
                return self._redact(
                    json.dumps(data["detail"]) if not isinstance(data["detail"], str) else data["detail"]
                ), None
            if data.get("message"):
                return self._redact(str(data["message"])), None
        return self._redact(text.strip()) or "no details", None

    async def _raise_for_status(self, response: aiohttp.ClientResponse) -> None:
        if response.status >= 400:
            self._fail(response.status, await response.read(), _retry_after(response.headers.get("Retry-After")))

    def _fail(self, status: int, raw: bytes, retry_after: float | None) -> NoReturn:
        """Raise the Airlock error an upstream error answer (``status`` >= 400, body ``raw``) maps onto."""
        message, param = self._error_message(raw)
        if status in (401, 403):
            logger.error("upstream %s rejected Airlock's credentials (HTTP %d): %s", self.base_url, status, message)
            raise BackendError(
                f"the upstream model server rejected the gateway's credentials (HTTP {status}); "
                "the operator must check the upstream API key",
                code="upstream_auth_failed",
            )
        if status == 404:
            # Path and model id come from the operator's config, never from the evaluator.
            logger.error("upstream %s answered 404 for model %r: %s", self.base_url, self.model, message)
            raise BackendError("the upstream model server does not serve the configured model or path (HTTP 404)")
        if status == 429:
            raise RateLimitError(
                f"the upstream model server is rate limiting requests: {message}",
                code="upstream_rate_limited",
                retry_after=retry_after,
            )
        if status == 503:
            logger.warning("upstream %s unavailable (HTTP 503): %s", self.base_url, message)
            raise BackendUnavailableError("the upstream model server is unavailable (HTTP 503)")
        if status < 500:
            raise InvalidRequestError(f"upstream rejected the request: {message}", param=param)
        logger.warning("upstream %s failed (HTTP %d): %s", self.base_url, status, message)
        raise BackendError(f"the upstream model server failed (HTTP {status})")

    def _unreachable(self, exc: BaseException) -> NoReturn:
        logger.warning("upstream %s unreachable: %s", self.base_url, self._redact(repr(exc)))
        raise BackendUnavailableError("the upstream model server is unreachable") from None

    def _timed_out(self) -> NoReturn:
        logger.warning("upstream %s timed out after %.1fs", self.base_url, self.config.timeout_s)
        raise BackendUnavailableError(
            f"the upstream model server did not answer within {self.config.timeout_s:g}s", code="upstream_timeout"
        ) from None

    def _bad_response(self, detail: str) -> NoReturn:
        logger.warning("upstream %s sent an invalid response: %s", self.base_url, self._redact(detail))
        raise BackendError("the upstream model server sent an invalid response") from None

    async def _post_json(self, path: str, body: bytes | None, *, root: str | None = None) -> dict[str, Any]:
        """POST ``body`` (GET when None) and return the JSON object answered, retrying connect failures and 503s."""
        return self._json_object(await self._post_bytes(path, body, root=root))

    def _json_object(self, raw: bytes | str, what: str = "body") -> dict[str, Any]:
        """Parse an answer's body (or a stream event) as a JSON object (anything else is the upstream's fault: 502)."""
        try:
            data = json.loads(raw)
        except ValueError:
            self._bad_response(f"{what} is not JSON: {raw[:200]!r}")
        if not isinstance(data, dict):
            self._bad_response(f"{what} is not a JSON object: {raw[:200]!r}")
        return data

    def _answer(self, raw: bytes, model: type[AnswerT], what: str) -> tuple[AnswerT, bool]:
        """Validate an upstream answer as ``model``; return it and whether the upstream reported usage.

        A standard answer is parsed and validated in one pass from its bytes; anything that pass
        refuses (a non-standard finish reason, usage null, invalid JSON) takes the general path,
        the body as a JSON object with finish reasons normalised, so the result is the same.
        """
        try:
            result = model.model_validate_json(raw)
        except ValidationError:
            pass
        else:
            return result, "usage" in result.model_fields_set and result.usage is not None
        data = self._json_object(raw)
        _normalize_choices(data)
        try:
            result = model.model_validate(data)
        except ValidationError as exc:
            self._bad_response(f"{what} does not validate: {exc.errors(include_input=False)}")
        return result, data.get("usage") is not None

    async def _post_bytes(self, path: str, body: bytes | None, *, root: str | None = None) -> bytes:
        """POST ``body`` (GET when None) and return the body of the 2xx answer, retrying connect failures and 503s."""
        attempt = 0
        while True:
            answer = await self._exchange(path, body, root=root, retryable=attempt < self.config.max_retries)
            if answer is None or (answer.status == 503 and attempt < self.config.max_retries):
                attempt += 1
                hint = _retry_after(answer.headers.get("retry-after")) if answer is not None else None
                await asyncio.sleep(_backoff(attempt, hint))
                continue
            if answer.status >= 400:
                self._fail(answer.status, answer.body, _retry_after(answer.headers.get("retry-after")))
            return answer.body

    async def _exchange(
        self, path: str, body: bytes | None, *, root: str | None = None, retryable: bool = False
    ) -> http1.Answer | None:
        """Send one request (GET when ``body`` is None) and return its answer; None: a failure worth retrying."""
        resource = _resource((root or self.base_url) + path)
        try:
            return await self._client().request(
                "GET" if body is None else "POST", resource, body, self.config.timeout_s
            )
        except (http1.ConnectFailed, http1.Disconnected) as exc:
            # The request never reached a working upstream, or a kept-alive connection had gone
            # stale: generation has no side effects, so these are safe to retry.
            if retryable:
                return None
            self._unreachable(exc)
        except TimeoutError:
            # Not retried: the upstream may still be generating, and a retry would double its load.
            self._timed_out()
        except http1.BadResponse as exc:
            self._bad_response(repr(exc))

    async def _stream_events(self, path: str, body: bytes) -> AsyncGenerator[dict[str, Any], None]:
        """POST ``body`` with ``stream: true`` and yield each SSE ``data:`` event as a JSON object."""
        url = self.base_url + path
        try:
            async with self._get_session().post(url, data=body, timeout=self._stream_timeout) as response:
                await self._raise_for_status(response)
                content_type = response.headers.get("Content-Type", "")
                if "text/event-stream" not in content_type:
                    self._bad_response(f"expected an event stream, got {content_type!r}")
                async for data in _sse_data(response.content):
                    if data == "[DONE]":
                        return
                    event = self._json_object(data, "stream event")
                    if "error" in event and not event.get("choices"):
                        message, _ = self._error_message(json.dumps(event).encode())
                        logger.warning("upstream %s reported an error mid-stream: %s", self.base_url, message)
                        raise BackendError("the upstream model server failed while streaming")
                    yield event
        except AirlockError:
            raise
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            self._unreachable(exc)
        except TimeoutError:
            self._timed_out()
        except (aiohttp.ClientError, HttpProcessingError, UnicodeDecodeError, ValueError) as exc:
            self._bad_response(f"stream interrupted: {exc!r}")

    # ------------------------------------------------------------ vLLM: tokenizer endpoints

    def _check_vllm(self) -> None:
        if self.config.engine != "vllm":
            raise InvalidRequestError(
                "this model's server offers no tokenizer endpoints", code="tokenizer_not_available"
            )

    async def tokenize(self, request: tokenization.TokenizeRequest) -> tokenization.TokenizeResponse:
        """Forward to vLLM's ``/tokenize`` (for the served base model)."""
        self._check_vllm()
        body = request.model_dump(mode="json", exclude_unset=True) | {"model": self._base_model}
        data = await self._post_json("/tokenize", json.dumps(body).encode(), root=self.config.server_root)
        try:
            return tokenization.TokenizeResponse.model_validate(data)
        except ValidationError as exc:
            self._bad_response(f"tokenize answer does not validate: {exc.errors(include_input=False)}")

    async def detokenize(self, request: tokenization.DetokenizeRequest) -> tokenization.DetokenizeResponse:
        """Forward to vLLM's ``/detokenize``."""
        self._check_vllm()
        body = {"model": self._base_model, "tokens": request.tokens}
        data = await self._post_json("/detokenize", json.dumps(body).encode(), root=self.config.server_root)
        try:
            return tokenization.DetokenizeResponse.model_validate(data)
        except ValidationError as exc:
            self._bad_response(f"detokenize answer does not validate: {exc.errors(include_input=False)}")

    async def tokenizer_info(self) -> dict[str, Any]:
        """Forward to vLLM's ``/tokenizer_info`` (served with ``--enable-tokenizer-info-endpoint``), paths left out."""
        self._check_vllm()
        data = await self._post_json("/tokenizer_info", None, root=self.config.server_root)
        if not isinstance(data.get("tokenizer_class"), str):
            self._bad_response("tokenizer_info answer has no tokenizer_class")
        return tokenization.public_tokenizer_info(data)

    # ------------------------------------------------------------ vLLM: runtime LoRA adapters

    @property
    def _base_model(self) -> str:
        return self.model

    def served_adapter_name(self, name: str, path: Path) -> str:
        """Return the opaque name adapter ``name`` (at ``path``) is loaded under on the server."""
        digest = hashlib.sha256(f"{self.config.server_root}\0{name}\0{Path(path).resolve()}".encode()).hexdigest()
        return "airlock-lora-" + digest[:24]

    def _server_path(self, path: Path) -> str:
        """Return where the server reads the adapter at ``path`` (``adapter_root`` maps the job directories)."""
        if self.config.adapter_root is None:
            return str(Path(path).resolve())
        local = Path(path).resolve()
        return f"{self.config.adapter_root.rstrip('/')}/{local.parent.name}/{local.name}"

    @property
    def adapters(self) -> tuple[str, ...]:
        """Adapters this gateway has loaded into the server (by Airlock's name)."""
        return tuple(self._adapters)

    async def load_adapter(self, name: str, path: Path) -> None:
        """Load LoRA adapter ``name`` into the vLLM server (``POST /v1/load_lora_adapter``) under an opaque name.

        The server must run with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``. An
        adapter already loaded under that name (this gateway restarted) is reused. Failures are
        logged with their details for the operator; the caller only learns that loading failed.
        """
        if self.config.engine != "vllm":
            raise InvalidRequestError("this model's server cannot load fine-tuned adapters", param="model")
        served = self.served_adapter_name(name, path)
        server_path = self._server_path(path)
        self._adapter_secrets.update({served, server_path, str(Path(path).resolve())})
        body = json.dumps({"lora_name": served, "lora_path": server_path}).encode()
        status, raw = await self._post_raw("/load_lora_adapter", body)
        if status != 200 and not (status == 400 and b"already been loaded" in raw):
            logger.error(
                "upstream %s could not load adapter %s from %s (HTTP %d): %s",
                self.base_url,
                served,
                server_path,
                status,
                raw[:_MAX_ERROR_CHARS].decode("utf-8", errors="replace"),
            )
            raise BackendError(
                "the model server could not load the fine-tuned model; the operator has the details",
                code="adapter_load_failed",
            )
        self._adapters[name] = served
        self._adapter_paths[name] = Path(path)
        logger.info("upstream %s: adapter %s loaded as %s", self.base_url, name, served)

    async def unload_adapter(self, name: str) -> bool:
        """Unload adapter ``name`` from the server (``POST /v1/unload_lora_adapter``); return whether it was loaded."""
        served = self._adapters.pop(name, None)
        if served is None:
            return False
        status, raw = await self._post_raw("/unload_lora_adapter", json.dumps({"lora_name": served}).encode())
        if status not in (200, 404):
            logger.error(
                "upstream %s could not unload adapter %s (HTTP %d): %r", self.base_url, served, status, raw[:200]
            )
            raise BackendError("the model server could not unload the fine-tuned model", code="adapter_unload_failed")
        return status == 200

    def adapter_view(self, name: str) -> OpenAIUpstreamBackend:
        """Return a backend whose requests run on adapter ``name`` (loaded first with :meth:`load_adapter`)."""
        served = self._adapters.get(name)
        if served is None:
            raise InvalidRequestError(f"adapter {name!r} is not loaded", param="model")
        return _UpstreamAdapterView(self, name, served)

    async def _post_raw(self, path: str, body: bytes) -> tuple[int, bytes]:
        """POST ``body`` to ``base_url + path`` once; return the status and body (transport failures: 503)."""
        answer = await self._exchange(path, body)
        assert answer is not None  # not retryable: failures raise
        return answer.status, answer.body

    # ------------------------------------------------------------ chat

    def _chat_usage(self, request: ChatCompletionRequest, texts: Mapping[int, list[str]]) -> Usage:
        prompt = sum(self.count_tokens(m.text()) for m in request.messages)
        completion = sum(self.count_tokens("".join(parts)) for parts in texts.values() if parts)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion:
        """Forward a chat completion to the upstream."""
        self._check_chat(request)
        raw = await self._post_bytes("/chat/completions", self._payload(request, stream=False))
        result, has_usage = self._answer(raw, ChatCompletion, "chat completion")
        if not has_usage:
            texts = {c.index: [c.message.content or ""] for c in result.choices}
            result = result.model_copy(update={"usage": self._chat_usage(request, texts)})
        return result

    async def chat_stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        """Stream a chat completion from the upstream; the final chunk carries usage."""
        self._check_chat(request)
        usage: Usage | None = None
        texts: dict[int, list[str]] = {}
        last: ChatCompletionChunk | None = None
        events = self._stream_events("/chat/completions", self._payload(request, stream=True))
        # Closed deterministically, so an error or an abandoned stream releases the connection now.
        async with contextlib.aclosing(events):
            async for event in events:
                _normalize_choices(event)
                event.setdefault("id", last.id if last else "chatcmpl-upstream")
                event.setdefault("model", self.model)
                try:
                    chunk = ChatCompletionChunk.model_validate(event)
                except ValidationError as exc:
                    self._bad_response(f"chat chunk does not validate: {exc.errors(include_input=False)}")
                last = chunk
                if chunk.usage is not None:
                    usage = chunk.usage
                if chunk.choices:
                    for choice in chunk.choices:
                        if choice.delta.content:
                            texts.setdefault(choice.index, []).append(choice.delta.content)
                    # Usage is reported once, on the final chunk, whatever the upstream did.
                    yield chunk.model_copy(update={"usage": None}) if chunk.usage is not None else chunk
        if usage is None:
            usage = self._chat_usage(request, texts)
        if last is None:
            yield ChatCompletionChunk(id="chatcmpl-upstream", model=self.model, choices=[], usage=usage)
        else:
            yield ChatCompletionChunk(id=last.id, model=last.model, created=last.created, choices=[], usage=usage)

    # ------------------------------------------------------------ completions

    def _completion_usage(self, request: CompletionRequest, texts: Mapping[int, list[str]]) -> Usage:
        prompt = 0
        for item in request.prompts():
            prompt += self.count_tokens(item) if isinstance(item, str) else len(item)
        completion = sum(self.count_tokens("".join(parts)) for parts in texts.values() if parts)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def complete(self, request: CompletionRequest) -> Completion:
        """Forward a text completion to the upstream."""
        self._check_completion(request)
        raw = await self._post_bytes("/completions", self._payload(request, stream=False))
        result, has_usage = self._answer(raw, Completion, "completion")
        if not has_usage:
            texts = {c.index: [c.text] for c in result.choices}
            result = result.model_copy(update={"usage": self._completion_usage(request, texts)})
        return result

    async def complete_stream(self, request: CompletionRequest) -> AsyncIterator[Completion]:
        """Stream a text completion from the upstream; the final chunk carries usage."""
        self._check_completion(request)
        usage: Usage | None = None
        texts: dict[int, list[str]] = {}
        last: Completion | None = None
        events = self._stream_events("/completions", self._payload(request, stream=True))
        # Closed deterministically, so an error or an abandoned stream releases the connection now.
        async with contextlib.aclosing(events):
            async for event in events:
                _normalize_choices(event)
                event.setdefault("id", last.id if last else "cmpl-upstream")
                event.setdefault("model", self.model)
                raw_usage = event.get("usage")
                try:
                    # Completion.usage defaults to zeros; a chunk without usage must not look like one with it.
                    chunk = Completion.model_validate({**event, "usage": None})
                    if raw_usage is not None:
                        usage = Usage.model_validate(raw_usage)
                except ValidationError as exc:
                    self._bad_response(f"completion chunk does not validate: {exc.errors(include_input=False)}")
                last = chunk
                if chunk.choices:
                    for choice in chunk.choices:
                        if choice.text:
                            texts.setdefault(choice.index, []).append(choice.text)
                    yield chunk
        if usage is None:
            usage = self._completion_usage(request, texts)
        if last is None:
            yield Completion(id="cmpl-upstream", model=self.model, choices=[], usage=usage)
        else:
            yield Completion(id=last.id, model=last.model, created=last.created, choices=[], usage=usage)


class _UpstreamAdapterView(OpenAIUpstreamBackend):
    """The upstream backend with every request sent to one runtime-loaded LoRA adapter (by its opaque name).

    It shares its parent's HTTP session and hidden strings; a server that lost the adapter (it
    restarted) makes the parent forget it, so the next request loads it again.
    """

    def __init__(self, parent: OpenAIUpstreamBackend, name: str, served: str) -> None:
        super().__init__(parent.config, parent._api_key)
        self._parent = parent
        self._name = name
        self.model = served
        self._adapters = parent._adapters
        self._adapter_paths = parent._adapter_paths
        self._adapter_secrets = parent._adapter_secrets

    @property
    def _base_model(self) -> str:
        return self._parent.model

    def _get_session(self) -> aiohttp.ClientSession:
        return self._parent._get_session()

    async def start(self) -> None:
        """Start the parent backend (the view owns no connections)."""
        await self._parent.start()

    async def aclose(self) -> None:
        """Do nothing: the parent owns the session."""

    async def _ensure_loaded(self) -> None:
        if self._name not in self._adapters:
            await self._parent.load_adapter(self._name, self._adapter_paths[self._name])

    async def _post_bytes(self, path: str, body: bytes | None, *, root: str | None = None) -> bytes:
        await self._ensure_loaded()
        return await super()._post_bytes(path, body, root=root)

    async def _stream_events(self, path: str, body: bytes) -> AsyncGenerator[dict[str, Any], None]:
        await self._ensure_loaded()
        events = super()._stream_events(path, body)
        async with contextlib.aclosing(events):
            async for event in events:
                yield event

    def _client(self) -> http1.Http1Client:
        return self._parent._client()

    def _fail(self, status: int, raw: bytes, retry_after: float | None) -> NoReturn:
        if status == 404:
            # The server no longer has the adapter (it restarted): load it again on the next request.
            logger.warning("upstream %s lost adapter %s; it will be loaded again", self.base_url, self.model)
            self._adapters.pop(self._name, None)
            raise BackendUnavailableError("the fine-tuned model is being reloaded on the model server; retry")
        super()._fail(status, raw, retry_after)


async def _sse_data(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """Yield the data of each server-sent event (multi-line data joined with newlines)."""
    data_lines: list[str] = []
    async for raw in content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data_lines:
                yield "\n".join(data_lines)
                data_lines = []
            continue
        if line.startswith(":"):
            continue  # comment / keep-alive
        field, _, value = line.partition(":")
        if field == "data":
            data_lines.append(value[1:] if value.startswith(" ") else value)
    if data_lines:
        yield "\n".join(data_lines)


@functools.lru_cache(maxsize=256)
def _resource(url: str) -> str:
    """Return the path and query of ``url`` (what the request line names)."""
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _normalize_choices(data: dict[str, Any]) -> None:
    """Map non-standard finish reasons onto the wire model's set, in place."""
    choices = data.get("choices")
    if not isinstance(choices, list):
        return
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        reason = choice.get("finish_reason")
        if reason is not None and reason not in _FINISH_REASONS:
            choice["finish_reason"] = _FINISH_ALIASES.get(str(reason), "stop")


def _retry_after(value: str | None) -> float | None:
    """Return a ``Retry-After`` header's delay in seconds (None: absent, a date, or invalid)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _backoff(attempt: int, hint: float | None = None) -> float:
    """Return the delay before retry ``attempt`` (1-based): exponential with jitter, capped at 5 s."""
    base = min(5.0, 0.2 * 2.0 ** (attempt - 1))
    delay = base * (0.5 + random.random() / 2)
    if hint is not None:
        delay = max(delay, min(hint, 5.0))
    return delay
