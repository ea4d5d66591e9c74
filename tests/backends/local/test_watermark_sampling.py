"""The local backend watermarks sampled rows with the request's key; greedy rows and keyless requests are untouched."""

from __future__ import annotations

from airlock.backends.local import LocalBackend
from airlock.backends.protocol import CompletionRequest
from airlock.backends.watermark import detect
from tests.backends.local.helpers import chat, text_of

KEY, OTHER = b"g" * 32, b"h" * 32


def completion(key: bytes | None, **kwargs: object) -> CompletionRequest:
    kwargs.setdefault("max_tokens", 60)
    request = CompletionRequest.model_validate({"model": "tiny", "prompt": "The history of the", **kwargs})
    request.set_watermark_key(key)
    return request


async def test_sampled_completions_carry_the_key(tiny_backend: LocalBackend) -> None:
    result = await tiny_backend.complete(completion(KEY, temperature=1.0, n=2, seed=11))
    ids = [t for c in result.choices for t in tiny_backend.tokenizer(c.text, add_special_tokens=False)["input_ids"]]
    assert detect(KEY, ids).p_value < 1e-4
    assert detect(OTHER, ids).p_value > 1e-3
    plain = await tiny_backend.complete(completion(None, temperature=1.0, n=2, seed=11))
    plain_ids = [
        t for c in plain.choices for t in tiny_backend.tokenizer(c.text, add_special_tokens=False)["input_ids"]
    ]
    assert detect(KEY, plain_ids).p_value > 1e-3


async def test_watermarked_sampling_stays_diverse_and_seeded_requests_reproduce(tiny_backend: LocalBackend) -> None:
    unseeded = [await tiny_backend.complete(completion(KEY, temperature=1.0, max_tokens=12)) for _ in range(4)]
    assert len({r.choices[0].text for r in unseeded}) == 4  # identical requests, different outputs
    first = await tiny_backend.complete(completion(KEY, temperature=1.0, max_tokens=12, seed=5))
    again = await tiny_backend.complete(completion(KEY, temperature=1.0, max_tokens=12, seed=5))
    assert first.choices[0].text == again.choices[0].text


async def test_greedy_carries_no_watermark(tiny_backend: LocalBackend) -> None:
    request = chat("Hello there!", max_tokens=16)
    request.set_watermark_key(KEY)
    assert text_of(await tiny_backend.chat(request)) == text_of(
        await tiny_backend.chat(chat("Hello there!", max_tokens=16))
    )


async def test_the_key_survives_the_copies_a_pipeline_makes(tiny_backend: LocalBackend) -> None:
    request = completion(KEY, temperature=1.0)
    assert request.model_copy(update={"stream": False}).watermark_key == KEY
    assert "watermark" not in request.model_dump_json()  # never on the wire
