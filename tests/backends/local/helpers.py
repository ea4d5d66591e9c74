"""Requests, references and readers shared by the local backend's test modules."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import torch

from airlock.backends.local import LocalBackend
from airlock.backends.local.tokens import TokenTable
from airlock.backends.protocol import ChatCompletion, ChatCompletionRequest, ChatMessage

PROMPTS = [
    "Hello there!",
    "What is the capital of France?",
    "Write a haiku about autumn leaves falling slowly.",
    "2+2=",
    "Tell me a story about a dragon who learned to paint with watercolours.",
    "ok",
]


def chat(content: str = "Hello there!", **kwargs: Any) -> ChatCompletionRequest:
    kwargs.setdefault("temperature", 0.0)
    kwargs.setdefault("max_tokens", 8)
    return ChatCompletionRequest(model="tiny", messages=[ChatMessage(role="user", content=content)], **kwargs)


def text_of(result: ChatCompletion, index: int = 0) -> str:
    content = result.choices[index].message.content
    assert content is not None
    return content


def chat_ids(backend: LocalBackend, content: str) -> list[int]:
    tok = backend.tokenizer
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return list(tok(rendered, add_special_tokens=False)["input_ids"])


def forward_logprobs(backend: LocalBackend, ids: list[int]) -> torch.Tensor:
    """Log-softmax of a plain, unbatched, cache-free forward pass: the reference values."""
    with torch.inference_mode():
        return torch.log_softmax(backend.model(torch.tensor([ids])).logits[0].float(), dim=-1)


def greedy_reference(backend: LocalBackend, ids: list[int], steps: int) -> list[tuple[int, float]]:
    ids = list(ids)
    out: list[tuple[int, float]] = []
    for _ in range(steps):
        lp = forward_logprobs(backend, ids)[-1]
        token = int(lp.argmax())
        out.append((token, float(lp[token])))
        ids.append(token)
    return out


def table(backend: LocalBackend) -> TokenTable:
    return backend._table()


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [chunk async for chunk in stream]
