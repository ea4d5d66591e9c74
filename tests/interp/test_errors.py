"""Interp's errors: a failed job's OpenAI-style error, and a refused patch that keeps its own code."""

from __future__ import annotations

from airlock.interp.errors import InterpJobError, PatchRefused, RequestError


def test_a_job_error_is_an_openai_style_error_with_its_code() -> None:
    error = InterpJobError("the job used up its CPU limit", code="cpu_limit")
    assert error.status_code == 422
    assert error.to_openai()["error"] == {
        "message": "the job used up its CPU limit",
        "type": "interp_job_error",
        "param": None,
        "code": "cpu_limit",
    }


def test_a_refused_patch_is_a_request_error_that_carries_the_job_error_code() -> None:
    refused = PatchRefused("patching 'model.norm' is not allowed", code="patch_not_allowed")
    # Handlers of RequestError answer it like any refused request; the RPC server also fails the job with the code.
    assert isinstance(refused, RequestError) and str(refused) == "patching 'model.norm' is not allowed"
    assert refused.code == "patch_not_allowed"
