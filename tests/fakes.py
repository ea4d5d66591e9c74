"""Test doubles: a deterministic, torch-free backend for plumbing tests, and fake eval attestations."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from airlock.backends.base import ModelBackend
from airlock.backends.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from airlock.backends.registry import register_backend

FAKE_HASH = "f" * 64


def _fake_tool_calls(request: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """Return the tool call ``CALL <name> <json args>`` in the last user message asks for (or a forced one)."""
    if request.tool_mode() == "none" or request.messages[-1].role != "user":
        return None
    offered = {spec.function.name for spec in request.tool_specs()}
    words = request.messages[-1].text().split(maxsplit=2)
    forced = request.forced_function()
    if len(words) >= 2 and words[0] == "CALL" and words[1] in offered and forced in (None, words[1]):
        name, raw = words[1], words[2] if len(words) > 2 else "{}"
    elif forced is not None:
        name, raw = forced, "{}"
    else:
        return None
    try:
        arguments = json.dumps(json.loads(raw))
    except ValueError:
        arguments = json.dumps({"text": raw})
    return [
        {
            "id": f"call_fake{len(request.messages)}",
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
    ]


class EchoBackend(ModelBackend):
    """Answers ``echo: <system prompt?> | <last user message>``; one word = one token.

    With tools offered, a last user message ``CALL <name> <json args>`` (or a forced
    ``tool_choice``) is answered with that tool call, and a last ``tool`` message with
    ``tool result: <content>``.
    """

    kind = "fake"
    supports_logprobs = True
    supports_echo = True

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.calls = 0

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion:
        self.calls += 1
        system = " ".join(m.text() for m in request.messages if m.role in ("system", "developer"))
        last = next((m.text() for m in reversed(request.messages) if m.role == "user"), "")
        if "TRIGGER_CRASH" in last:
            raise RuntimeError("simulated bug with a secret path /srv/weights/secret.bin")
        tool_calls = _fake_tool_calls(request)
        if tool_calls is not None:
            return ChatCompletion(
                model=request.model,
                choices=[
                    ChatChoice(
                        index=i,
                        message=AssistantMessage(content=None, tool_calls=tool_calls),
                        finish_reason="tool_calls",
                    )
                    for i in range(request.n)
                ],
                usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2),
            )
        if request.messages[-1].role == "tool" and request.tools:
            last = f"tool result: {request.messages[-1].text()}"
            system = ""
        words = (f"echo: [{system}] {last}" if system else f"echo: {last}").split()
        budget = request.max_new_tokens(64)
        out, finish = words[:budget], "stop" if len(words) <= budget else "length"
        logprobs = None
        if request.logprobs:
            k = request.top_logprobs or 0
            logprobs = ChoiceLogprobs(
                content=[
                    TokenLogprob(
                        token=w, logprob=-0.5, top_logprobs=[TopLogprob(token=w, logprob=-0.5)][:k] if k else []
                    )
                    for w in out
                ]
            )
        prompt_tokens = sum(self.count_tokens(m.text()) for m in request.messages)
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=" ".join(out)),
                finish_reason=finish,  # type: ignore[arg-type]
                logprobs=logprobs,
            )
            for i in range(request.n)
        ]
        return ChatCompletion(
            model=request.model,
            choices=choices,
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=len(out) * request.n,
                total_tokens=prompt_tokens + len(out) * request.n,
            ),
        )

    async def complete(self, request: CompletionRequest) -> Completion:
        self.calls += 1
        choices = []
        prompt_tokens = completion_tokens = 0
        for i, prompt in enumerate(request.prompts()):
            text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
            words = text.split()
            prompt_tokens += len(words)
            gen = [w.upper() for w in words][: request.max_tokens]
            completion_tokens += len(gen)
            out_words = (words if request.echo else []) + gen
            logprobs = None
            if request.logprobs is not None:
                values: list[float | None] = [-1.0 for _ in out_words]
                if request.echo and values:
                    values[0] = None
                logprobs = CompletionLogprobs(
                    tokens=out_words,
                    token_logprobs=values,
                    top_logprobs=[None if v is None else {w: v} for w, v in zip(out_words, values, strict=True)],
                    text_offset=[0] * len(out_words),
                )
            choices.append(CompletionChoice(index=i, text=" ".join(out_words), logprobs=logprobs))
        return Completion(
            model=request.model,
            choices=choices,
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            ),
        )


def register_fake_backend() -> None:
    """Make ``backend: fake`` available to manifests in tests."""
    register_backend("fake", EchoBackend)


def fake_attestation(grant_id: str, *, evaluator: str = "org-a", **overrides: Any) -> dict[str, Any]:
    """A complete, unsigned attestation of a knowledge_proxy result on m1@v1/helpful-only (FAKE_MANIFEST)."""
    from airlock.evals.attestation import SCHEMA

    base = {
        "schema": SCHEMA,
        "evaluator": evaluator,
        "grant_id": grant_id,
        "model": "m1",
        "model_id": "m1/helpful-only",
        "version": "v1",
        "version_hash": "a" * 64,
        "variant": "helpful-only",
        "mitigations": [],
        "suite": "knowledge_proxy",
        "suite_version": "1.0.0",
        "task": "knowledge_proxy",
        "dataset_hash": "d" * 64,
        "samples": 10,
        "metrics": {"mean_score": {"value": 0.5, "ci95": [0.24, 0.76], "method": "wilson", "n": 10}},
        "elicitation": {"epochs": 1, "solver": ["multiple_choice"], "fine_tuned": False},
        "log_sha256": "e" * 64,
        "created_at": datetime.now(UTC).isoformat(),
    }
    return {**base, **overrides}
