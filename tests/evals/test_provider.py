"""The native Inspect provider ``airlock/<model>/<variant>`` against a live gateway (fake backend)."""

from __future__ import annotations

import json
import time
import zipfile
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import httpx
import pytest
from inspect_ai import Task, eval
from inspect_ai.dataset import Sample
from inspect_ai.log import EvalLog, read_eval_log
from inspect_ai.model import GenerateConfig, Model, get_model
from inspect_ai.scorer import includes
from inspect_ai.solver import generate, use_tools
from inspect_ai.tool import Tool, ToolFunction, tool
from openai import APIStatusError, AuthenticationError, BadRequestError, PermissionDeniedError, RateLimitError
from tenacity import RetryCallState

from airlock.access.quotas import MemoryRateLimiter
from airlock.evals.provider import (
    PROVENANCE_KEY,
    AirlockAPI,
    AirlockProviderError,
    RetryAfterWait,
    provenance_from_log,
    retry_after_seconds,
)
from tests.conftest import Lab


@pytest.fixture
def gateway_key(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """Point the provider at the lab's gateway with a fresh grant; returns (grant_id, key)."""
    grant_id, key = lab.grant()
    monkeypatch.setenv("AIRLOCK_BASE_URL", lab.url + "/v1")
    monkeypatch.setenv("AIRLOCK_API_KEY", key)
    return grant_id, key


def airlock_model(name: str, **model_args: Any) -> Model:
    # memoize=False: Inspect caches models by name, and every test has its own gateway.
    return get_model(f"airlock/{name}", memoize=False, **model_args)


def run(task: Task, model: Model, tmp_path: Path, **kwargs: Any) -> EvalLog:
    kwargs.setdefault("max_retries", 0)
    (log,) = eval(task, model=model, log_dir=str(tmp_path / "logs"), display="none", **kwargs)
    return log


def echo_task(n: int = 3) -> Task:
    samples = [
        Sample(input="alpha beta", target="alpha"),
        Sample(input="gamma delta", target="gamma"),
        Sample(input="epsilon", target="omega"),
        Sample(input="zeta", target="zeta"),
    ]
    return Task(dataset=samples[:n], solver=generate(), scorer=includes())


def chat_rows(lab: Lab) -> list[Any]:
    return [r for r in lab.audit_rows() if r.path == "/v1/chat/completions"]


# ---------------------------------------------------------------- evals and provenance


def test_eval_scores_and_records_provenance(lab: Lab, gateway_key: tuple[str, str], tmp_path: Path) -> None:
    grant_id, _key = gateway_key
    log = run(echo_task(), airlock_model("m1/production"), tmp_path)
    assert log.status == "success", log.error.traceback if log.error else None
    assert log.eval.model == "airlock/m1/production"
    assert log.results is not None
    assert log.results.scores[0].metrics["accuracy"].value == pytest.approx(2 / 3)

    # Read back from the .eval file itself, as the attestation code will.
    provenance = provenance_from_log(read_eval_log(log.location))
    variant = provenance["variant"]
    assert variant["grant_id"] == grant_id == provenance["grant"]["grant_id"]
    assert variant["version_hash"] == "a" * 64
    assert (variant["model"], variant["version"], variant["variant"]) == ("m1", "v1", "production")
    assert {(m["name"], m["stance"]) for m in variant["mitigations"]} == {
        ("safety-prompt", "disabled_for_eval"),
        ("input-filter", "claimed"),
        ("output-filter", "claimed"),
    }
    assert provenance["model_id"] == "m1/production"
    assert provenance["served_model_id"] == "m1@v1/production"
    assert provenance["grant"]["scopes"] == ["logprobs", "sample"]

    # The raw archive holds it too (every sample's output, every model event).
    with zipfile.ZipFile(log.location) as archive:
        sample_files = [n for n in archive.namelist() if n.startswith("samples/")]
        assert len(sample_files) == 3
        for name in sample_files:
            data = json.loads(archive.read(name))
            assert data["output"]["metadata"][PROVENANCE_KEY]["variant"]["grant_id"] == grant_id

    # Requests were pinned to the version the provenance names.
    rows = chat_rows(lab)
    assert len(rows) == 3 and {r.model for r in rows} == {"m1@v1/production"}
    assert all(r.outcome == "allowed" for r in rows)


def test_explicit_version_and_unpinned_requests(lab: Lab, gateway_key: tuple[str, str], tmp_path: Path) -> None:
    explicit = airlock_model("m1@v1/helpful-only")
    assert explicit.api.service_model_name() == "m1@v1/helpful-only"
    unpinned = airlock_model("m1/helpful-only", pin_version=False)
    log = run(echo_task(1), unpinned, tmp_path)
    assert log.status == "success"
    assert {r.model for r in chat_rows(lab)} == {"m1/helpful-only"}
    assert provenance_from_log(log)["served_model_id"] == "m1/helpful-only"


def test_arguments_override_the_environment(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    grant_id, key = lab.grant()
    monkeypatch.setenv("AIRLOCK_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens there
    monkeypatch.setenv("AIRLOCK_API_KEY", "ak-wrong")
    model = get_model("airlock/m1/helpful-only", base_url=lab.url + "/v1/", api_key=key, memoize=False)
    assert isinstance(model.api, AirlockAPI)
    assert model.api.provenance["variant"]["grant_id"] == grant_id
    assert model.api.provenance["base_url"] == lab.url + "/v1"


async def test_logprobs_pass_through(lab: Lab, gateway_key: tuple[str, str]) -> None:
    model = airlock_model("m1/helpful-only")
    output = await model.generate("one two", config=GenerateConfig(logprobs=True, top_logprobs=1))
    logprobs = output.choices[0].logprobs
    assert logprobs is not None
    assert [lp.token for lp in logprobs.content] == ["echo:", "one", "two"]
    assert all(lp.logprob == -0.5 and len(lp.top_logprobs or []) == 1 for lp in logprobs.content)
    assert output.metadata[PROVENANCE_KEY]["variant"]["variant"] == "helpful-only"


def test_provenance_from_log_rejects_logs_without_it(tmp_path: Path) -> None:
    log = run(echo_task(1), get_model("mockllm/model"), tmp_path)
    with pytest.raises(ValueError, match="no Airlock provenance"):
        provenance_from_log(log)
    header = read_eval_log(log.location, header_only=True)
    with pytest.raises(ValueError, match="no samples"):
        provenance_from_log(header)


# ---------------------------------------------------------------- set-up errors


def test_model_name_and_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRLOCK_BASE_URL", raising=False)
    monkeypatch.delenv("AIRLOCK_API_KEY", raising=False)
    with pytest.raises(ValueError, match="airlock/<model>/<variant>"):
        get_model("airlock/m1", memoize=False)
    with pytest.raises(ValueError, match="airlock/<model>/<variant>"):
        get_model("airlock/a/b/c", memoize=False)
    with pytest.raises(AirlockProviderError, match="AIRLOCK_BASE_URL and AIRLOCK_API_KEY"):
        get_model("airlock/m1/production", memoize=False)
    with pytest.raises(ValueError, match="Responses API"):
        get_model("airlock/m1/production", memoize=False, responses_api=True, base_url="http://x/v1", api_key="k")


def test_unreachable_gateway_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AirlockProviderError, match=r"cannot reach Airlock at http://127\.0\.0\.1:9/v1"):
        get_model("airlock/m1/production", base_url="http://127.0.0.1:9/v1", api_key="k", memoize=False)


def test_access_is_checked_before_any_sample(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    _gid, key = lab.grant(variants=["helpful-only"])
    monkeypatch.setenv("AIRLOCK_BASE_URL", lab.url + "/v1")
    monkeypatch.setenv("AIRLOCK_API_KEY", key)
    with pytest.raises(AirlockProviderError, match=r"denied access to 'm1/production': .*variant 'production'"):
        airlock_model("m1/production")
    with pytest.raises(AirlockProviderError, match="does not serve 'm1/nonexistent'"):
        airlock_model("m1/nonexistent")
    monkeypatch.setenv("AIRLOCK_API_KEY", "ak-not-a-key")
    with pytest.raises(AirlockProviderError, match="rejected the API key"):
        airlock_model("m1/helpful-only")
    assert chat_rows(lab) == []


def test_revoked_grant_fails_the_eval_without_retries(lab: Lab, gateway_key: tuple[str, str], tmp_path: Path) -> None:
    from airlock.access.service import revoke_grant

    grant_id, _key = gateway_key
    model = airlock_model("m1/helpful-only")
    with lab.db.session() as session:
        revoke_grant(session, grant_id, "test")
    # Generous retries: a 401/403 must still fail at once instead of backing off.
    log = run(echo_task(1), model, tmp_path, max_retries=5)
    assert log.status == "error" and log.error is not None
    assert "Airlock rejected the API key for 'm1/helpful-only'" in log.error.message
    assert "revoked" in log.error.message
    rows = chat_rows(lab)
    assert len(rows) == 1 and rows[0].outcome != "allowed"


def test_narrowed_grant_fails_the_eval_without_retries(lab: Lab, gateway_key: tuple[str, str], tmp_path: Path) -> None:
    from airlock.access.models import Grant
    from airlock.access.seal import seal_grant

    grant_id, _key = gateway_key
    model = airlock_model("m1/helpful-only")
    with lab.db.session() as session:
        grant = session.get(Grant, grant_id)
        assert grant is not None
        grant.variants = ["production"]
        seal_grant(session, grant)  # narrowed by the lab, so sealed
    log = run(echo_task(1), model, tmp_path, max_retries=5)
    assert log.status == "error" and log.error is not None
    assert "Airlock denied access to 'm1/helpful-only'" in log.error.message
    assert "variant 'helpful-only'" in log.error.message
    rows = chat_rows(lab)
    assert [r.error_code for r in rows] == ["variant_not_granted"]


# ---------------------------------------------------------------- retries


def test_rate_limited_requests_are_retried(lab: Lab, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _gid, key = lab.grant(quota_requests_per_minute=1)
    # A one-second window keeps the test fast; the gateway's Retry-After tells the provider how long to wait.
    lab.server.app.state.gateway.limiter = MemoryRateLimiter(window_s=1.0)
    monkeypatch.setenv("AIRLOCK_BASE_URL", lab.url + "/v1")
    monkeypatch.setenv("AIRLOCK_API_KEY", key)
    start = time.monotonic()
    log = run(echo_task(3), airlock_model("m1/helpful-only"), tmp_path, max_retries=10)
    elapsed = time.monotonic() - start
    assert log.status == "success", log.error.message if log.error else None
    assert log.results is not None and log.results.scores[0].metrics["accuracy"].value == pytest.approx(2 / 3)
    rows = chat_rows(lab)
    allowed = [r for r in rows if r.outcome == "allowed"]
    limited = [r for r in rows if r.error_code == "rate_limit_exceeded"]
    assert len(allowed) == 3 and limited, [(r.outcome, r.error_code) for r in rows]
    # Retry-After (1 s), not Inspect's default backoff (3 s and up), paced the retries.
    assert elapsed < 15


def test_exhausted_token_quota_is_not_retried(lab: Lab, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _gid, key = lab.grant(quota_total_tokens=1)
    monkeypatch.setenv("AIRLOCK_BASE_URL", lab.url + "/v1")
    monkeypatch.setenv("AIRLOCK_API_KEY", key)
    model = airlock_model("m1/helpful-only")
    first = run(echo_task(1), model, tmp_path)  # uses up the quota
    assert first.status == "success"
    lab.server.flush_audit()  # token totals are added with the audit batch
    log = run(echo_task(1), model, tmp_path, max_retries=5)
    assert log.status == "error" and log.error is not None
    assert "token quota exhausted" in log.error.message
    assert [r.error_code for r in chat_rows(lab)] == [None, "insufficient_quota"]


def _status_error(cls: type[APIStatusError], status: int, code: str | None, headers: dict[str, str]) -> APIStatusError:
    request = httpx.Request("POST", "http://airlock/v1/chat/completions")
    response = httpx.Response(status, headers=headers, request=request)
    body = {"error": {"message": "m", "type": "t", "code": code}}
    return cls("m", response=response, body=body)


def test_should_retry_classification(lab: Lab, gateway_key: tuple[str, str]) -> None:
    api = airlock_model("m1/helpful-only").api
    limited = api.should_retry(_status_error(RateLimitError, 429, "rate_limit_exceeded", {"Retry-After": "2"}))
    assert limited and getattr(limited, "kind", None) == "rate_limit"
    assert api.should_retry(_status_error(APIStatusError, 503, "backend_unavailable", {}))
    assert not api.should_retry(_status_error(RateLimitError, 429, "insufficient_quota", {}))
    assert not api.should_retry(_status_error(BadRequestError, 400, "invalid_request", {}))
    assert not api.should_retry(_status_error(AuthenticationError, 401, "invalid_api_key", {}))
    assert not api.should_retry(_status_error(PermissionDeniedError, 403, "permission_denied", {}))
    assert not api.should_retry(AirlockProviderError("denied"))
    with pytest.raises(AirlockProviderError, match="denied access to 'm1/helpful-only'"):
        api.handle_bad_request(_status_error(PermissionDeniedError, 403, "permission_denied", {}))


def _retry_state(ex: BaseException | None, attempt: int = 1) -> RetryCallState:
    state = MagicMock(spec=RetryCallState)
    state.attempt_number = attempt
    state.outcome = MagicMock()
    state.outcome.failed = ex is not None
    state.outcome.exception.return_value = ex
    return state


def test_retry_wait_honours_retry_after() -> None:
    wait = RetryAfterWait()
    seconds = wait(_retry_state(_status_error(RateLimitError, 429, None, {"Retry-After": "2"})))
    assert 2.0 <= seconds <= 2.5
    millis = wait(_retry_state(_status_error(RateLimitError, 429, None, {"retry-after-ms": "250"})))
    assert 0.25 <= millis <= 0.5
    # No header, or an absurd one: Inspect's exponential backoff (starts at 3 s, with jitter).
    assert 3.0 <= wait(_retry_state(_status_error(RateLimitError, 429, None, {}))) <= 6.0
    assert 3.0 <= wait(_retry_state(_status_error(RateLimitError, 429, None, {"Retry-After": "86400"}))) <= 6.0
    assert 3.0 <= wait(_retry_state(None)) <= 6.0


def test_retry_after_parsing() -> None:
    from datetime import UTC, datetime, timedelta

    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= (retry_after_seconds(_status_error(RateLimitError, 429, None, {"Retry-After": when})) or 0) <= 30
    assert retry_after_seconds(_status_error(RateLimitError, 429, None, {"Retry-After": "soon"})) is None
    assert retry_after_seconds(ValueError("no response")) is None


# ---------------------------------------------------------------- tools


@tool
def add() -> Tool:
    async def execute(a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first integer.
            b: The second integer.
        """
        return a + b

    return execute


def test_tool_calls_through_the_provider(lab: Lab, gateway_key: tuple[str, str], tmp_path: Path) -> None:
    task = Task(
        dataset=[Sample(input='CALL add {"a": 2, "b": 3}', target="5")],
        solver=[use_tools(add()), generate()],
        scorer=includes(),
    )
    log = run(task, airlock_model("m1/helpful-only"), tmp_path)
    assert log.status == "success", log.error.traceback if log.error else None
    assert log.results is not None and log.results.scores[0].metrics["accuracy"].value == 1.0
    assert log.samples is not None
    messages = log.samples[0].messages
    call = next(m for m in messages if m.role == "assistant" and m.tool_calls)
    assert call.tool_calls is not None
    assert call.tool_calls[0].function == "add" and call.tool_calls[0].arguments == {"a": 2, "b": 3}
    result = next(m for m in messages if m.role == "tool")
    assert result.text == "5"
    assert log.samples[0].output.completion == "echo: tool result: 5"
    assert provenance_from_log(log)["variant"]["variant"] == "helpful-only"


async def test_forced_tool_choice_through_the_provider(lab: Lab, gateway_key: tuple[str, str]) -> None:
    model = airlock_model("m1/helpful-only")
    output = await model.generate("no instruction here", tools=[add()], tool_choice=ToolFunction(name="add"))
    assert output.stop_reason == "tool_calls"
    assert output.message.tool_calls is not None and output.message.tool_calls[0].function == "add"


async def test_streaming_requests_through_the_provider(lab: Lab, gateway_key: tuple[str, str]) -> None:
    model = airlock_model("m1/helpful-only", stream=True)
    text = await model.generate("streamed words", config=GenerateConfig(logprobs=True))
    called = await model.generate("anything", tools=[add()], tool_choice=ToolFunction(name="add"))
    assert text.completion == "echo: streamed words"
    assert text.choices[0].logprobs is not None and len(text.choices[0].logprobs.content) == 3
    assert called.message.tool_calls is not None
    assert [(c.function, c.arguments) for c in called.message.tool_calls] == [("add", {})]
    assert text.metadata[PROVENANCE_KEY] == called.metadata[PROVENANCE_KEY]
