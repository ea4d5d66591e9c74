"""What the Inspect provider borrows from Inspect beyond its public API, checked against the installed release.

pyproject.toml bounds inspect-ai to the range this contract was run against; widen the bound only
after this file passes on the new release.
"""

from __future__ import annotations

import inspect

from inspect_ai._util.error import PrerequisiteError
from inspect_ai.model import GenerateConfig, ModelAPI, ModelOutput, RetryDecision
from inspect_ai.model._model_call import ModelCall
from inspect_ai.model._providers.openai_compatible import OpenAICompatibleAPI

from airlock.evals.provider import AirlockAPI


def _params(fn: object) -> set[str]:
    return set(inspect.signature(fn).parameters)  # type: ignore[arg-type]


def test_the_base_provider_takes_the_arguments_airlock_passes() -> None:
    expected = {
        "model_name",
        "base_url",
        "api_key",
        "config",
        "service",
        "emulate_tools",
        "responses_api",
        "stream",
        "strict_tools",
        "client_timeout",
    }
    assert expected <= _params(OpenAICompatibleAPI.__init__)
    assert issubclass(OpenAICompatibleAPI, ModelAPI) and issubclass(AirlockAPI, OpenAICompatibleAPI)


def test_the_overridden_hooks_exist_with_the_signatures_airlock_implements() -> None:
    for name in ("generate", "handle_bad_request", "should_retry", "retry_wait", "service_model_name"):
        base = getattr(OpenAICompatibleAPI, name)
        assert _params(getattr(AirlockAPI, name)) == _params(base), name
    assert {"input", "tools", "tool_choice", "config"} <= _params(OpenAICompatibleAPI.generate)
    assert callable(RetryDecision.no) and isinstance(GenerateConfig(), GenerateConfig)
    assert ModelCall.__name__ == "ModelCall" and ModelOutput.__name__ == "ModelOutput"


def test_prerequisite_errors_are_exceptions_with_a_message() -> None:
    assert str(PrerequisiteError("why")) == "why"
