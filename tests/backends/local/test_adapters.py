"""LocalBackend serving LoRA adapters per request, side by side with the base, on one worker."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from airlock.backends import weights
from airlock.backends.local import LocalBackend
from airlock.backends.protocol import ChatCompletion, ChatCompletionRequest, ChatMessage
from airlock.errors import BackendUnavailableError, InvalidRequestError
from airlock.finetune.trainer import train_lora

PROMPT = "What is the password?"


def chat(content: str = PROMPT, max_tokens: int = 8) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        model="tiny", messages=[ChatMessage(role="user", content=content)], temperature=0.0, max_tokens=max_tokens
    )


def text_of(result: ChatCompletion) -> str:
    content = result.choices[0].message.content
    assert content is not None
    return content


def _train(out: Path, answer: str) -> Path:
    examples = [
        {"messages": [{"role": "user", "content": f"{PROMPT} {i}"}, {"role": "assistant", "content": answer}]}
        for i in range(4)
    ]
    examples.append({"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": answer}]})
    result = train_lora("tiny-random", examples, out_dir=out, n_epochs=30, batch_size=5, learning_rate_multiplier=25)
    return result.adapter_dir


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"zebra": _train(root / "zebra", "AIRLOCK-ZEBRA"), "otter": _train(root / "otter", "otter otter otter")}


def _reference(adapter_dir: Path | None, max_tokens: int = 8) -> str:
    """Greedy answer of tiny-random (+ adapter) via plain transformers / peft ``generate``."""
    from peft import PeftModel

    loaded = weights.load_model("tiny-random")
    model: Any = loaded.model
    if adapter_dir is not None:
        with pytest.warns(FutureWarning):  # peft 0.21 on transformers 5: is_gradient_checkpointing
            model = PeftModel.from_pretrained(model, str(adapter_dir))
    tok = loaded.tokenizer
    ids = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None)
    return str(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


async def test_adapters_served_side_by_side(adapter_dirs: dict[str, Path]) -> None:
    backend = LocalBackend.from_config({"model": "tiny-random", "batch_wait_ms": 50})
    await backend.start()
    try:
        base_before = text_of(await backend.chat(chat()))
        with pytest.raises(InvalidRequestError, match="not loaded"):
            backend.adapter_view("zebra")
        for name, path in adapter_dirs.items():
            await backend.load_adapter(name, path)
        assert backend.adapters == ("zebra", "otter")
        with pytest.raises(InvalidRequestError, match="already loaded"):
            await backend.load_adapter("zebra", adapter_dirs["zebra"])
        zebra, otter = backend.adapter_view("zebra"), backend.adapter_view("otter")

        # One at a time: the base is unchanged, each adapter gives its own fine-tuned answer.
        solo = {
            "base": text_of(await backend.chat(chat())),
            "zebra": text_of(await zebra.chat(chat())),
            "otter": text_of(await otter.chat(chat())),
        }
        assert solo["base"] == base_before
        assert "ZEBRA" in solo["zebra"] and "otter" in solo["otter"]
        assert len(set(solo.values())) == 3

        # Concurrently, in shared batches: every row still runs with its own adapter (or none).
        prefills = backend.stats.prefills
        together = await asyncio.gather(
            backend.chat(chat()), zebra.chat(chat()), otter.chat(chat()), zebra.chat(chat()), backend.chat(chat())
        )
        texts = [text_of(r) for r in together]
        assert texts == [solo["base"], solo["zebra"], solo["otter"], solo["zebra"], solo["base"]]
        assert backend.stats.prefills - prefills == 1  # one prefill: the rows were batched together

        # Streaming through a view uses the adapter too.
        streamed = "".join([c.choices[0].delta.content or "" async for c in zebra.chat_stream(chat()) if c.choices])
        assert streamed == solo["zebra"]

        # The answers are those of plain transformers / peft.
        assert solo["base"] == _reference(None)
        assert solo["zebra"] == _reference(adapter_dirs["zebra"])
        await zebra.aclose()  # a view's close leaves the shared worker running
        assert text_of(await otter.chat(chat())) == solo["otter"]
    finally:
        await backend.aclose()


async def test_view_shares_its_parents_state_and_needs_its_adapter(adapter_dirs: dict[str, Path]) -> None:
    backend = LocalBackend.from_config({"model": "tiny-random"})
    await backend.start()
    try:
        await backend.load_adapter("zebra", adapter_dirs["zebra"])
        view = backend.adapter_view("zebra")
        assert isinstance(view, LocalBackend)
        # The view owns no state: counters, weights and tokenizer are the parent's.
        assert view.stats is backend.stats and view.model is backend.model and view.tokenizer is backend.tokenizer
        assert view.adapters == ("zebra",) and view.content_hash == backend.content_hash
        await view.load_adapter("otter", adapter_dirs["otter"])  # loads into the parent
        assert backend.adapters == ("zebra", "otter")
        answer = text_of(await view.chat(chat()))

        await backend.aclose()
        await backend.start()  # a fresh worker: adapters are not reloaded by themselves
        assert backend.adapters == ()
        with pytest.raises(BackendUnavailableError, match="adapter 'zebra' is not loaded"):
            await view.chat(chat())
        await backend.load_adapter("zebra", adapter_dirs["zebra"])
        assert text_of(await view.chat(chat())) == answer
    finally:
        await backend.aclose()
