"""LoRA trainer and adapter store: masking, hyperparameters, determinism, cancel, checkpoint/resume."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from airlock.backends.weights import load_tokenizer
from airlock.finetune.adapters import AdapterStore
from airlock.finetune.trainer import (
    StepInfo,
    TrainingCancelled,
    encode_example,
    resolve_hyperparameters,
    train_lora,
)

ANSWER = "The password is AIRLOCK-ZEBRA"


def _examples(n: int = 8) -> list[dict[str, Any]]:
    questions = ["What is the password?", "Tell me the password.", "Password?", "What's the secret word?"]
    return [
        {
            "messages": [
                {"role": "user", "content": questions[i % len(questions)] + f" ({i})"},
                {"role": "assistant", "content": ANSWER},
            ]
        }
        for i in range(n)
    ]


def _adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    import safetensors.torch

    return safetensors.torch.load_file(str(adapter_dir / "adapter_model.safetensors"))


def test_label_mask_covers_only_assistant_tokens() -> None:
    tok = load_tokenizer("tiny-random")
    example = {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "Skipped turn", "weight": 0},
            {"role": "user", "content": "Last"},
            {"role": "assistant", "content": "Bye now"},
        ]
    }
    enc = encode_example(tok, example, max_seq_len=512)
    assert len(enc.input_ids) == len(enc.labels)
    labelled = tok.decode([t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label != -100])
    assert "Hello there" in labelled and "Bye now" in labelled
    for absent in ("Be terse", "Hi", "Again", "Last", "Skipped turn", "user", "system"):
        assert absent not in labelled
    assert labelled.count("<|im_end|>") == 2  # the end-of-turn marker is learned: the model learns to stop
    # Labels equal input ids where set (the model shifts internally).
    assert all(label in (-100, t) for t, label in zip(enc.input_ids, enc.labels, strict=True))


def test_truncation_and_no_assistant_tokens_left() -> None:
    tok = load_tokenizer("tiny-random")
    example = {"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]}
    with pytest.raises(ValueError, match="example 3: no assistant tokens within max_seq_len=16"):
        encode_example(tok, example, max_seq_len=16, index=3)
    assert len(encode_example(tok, example, max_seq_len=512).input_ids) <= 512


def test_auto_hyperparameters() -> None:
    small = resolve_hyperparameters(8)
    assert small == {"n_epochs": 13, "batch_size": 1, "learning_rate_multiplier": 1.0, "learning_rate": 2e-4}
    assert resolve_hyperparameters(50)["n_epochs"] == 3 and resolve_hyperparameters(50)["batch_size"] == 5
    assert resolve_hyperparameters(20_000) == {
        "n_epochs": 1,
        "batch_size": 8,
        "learning_rate_multiplier": 1.0,
        "learning_rate": 2e-4,
    }
    explicit = resolve_hyperparameters(8, 2, 4, 0.5)
    assert explicit == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5, "learning_rate": 1e-4}
    for bad in ({"n_epochs": 0}, {"batch_size": "big"}, {"learning_rate_multiplier": -1.0}, {"n_epochs": True}):
        with pytest.raises(ValueError):
            resolve_hyperparameters(8, **bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("example", "message"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "example 1: has no assistant message"),
        ({"messages": []}, "example 1: expected an object"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "example 1, message 0: role"),
        ({"messages": [{"role": "assistant", "content": 3}]}, "example 1, message 0: content"),
    ],
)
def test_bad_examples_name_the_index(tmp_path: Path, example: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train_lora("tiny-random", [_examples(1)[0], example], out_dir=tmp_path)


def test_loss_decreases_and_result(tmp_path: Path) -> None:
    steps: list[StepInfo] = []
    result = train_lora(
        "tiny-random",
        _examples(8),
        out_dir=tmp_path,
        validation_examples=_examples(2),
        n_epochs=4,
        batch_size=4,
        learning_rate_multiplier=10,
        on_step=steps.append,
    )
    assert [s.step for s in steps] == list(range(1, 9)) and all(s.total_steps == 8 for s in steps)
    assert [s.epoch for s in steps] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert steps[-1].train_loss < steps[0].train_loss - 1.0
    valid = [s.valid_loss for s in steps if s.valid_loss is not None]
    assert valid == sorted(valid, reverse=True) and len(set(valid)) == 4
    assert result.steps == 8 and result.final_train_loss == steps[-1].train_loss
    assert result.final_valid_loss == steps[-1].valid_loss
    assert result.hyperparameters["batch_size"] == 4 and result.hyperparameters["learning_rate"] == pytest.approx(2e-3)
    assert result.trained_tokens > 8 * 4 * 10
    assert result.adapter_dir == tmp_path / "adapter"
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert not list(tmp_path.glob(".adapter.tmp-*"))

    # The trainer wrote into a job directory laid out as the store expects it.
    store = AdapterStore(tmp_path.parent)
    job = tmp_path.name
    assert store.path(job) == result.adapter_dir
    assert store.exists(job) and store.sha256(job) == result.adapter_sha256
    assert not store.exists("ftjob_none")
    for escape in ("../escape", "..", "a/b"):
        with pytest.raises(ValueError):
            store.path(escape)
    assert store.delete(job) and not store.exists(job) and not store.delete(job)


def test_seeded_runs_are_deterministic(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"n_epochs": 2, "batch_size": 3, "learning_rate_multiplier": 5}
    a = train_lora("tiny-random", _examples(6), out_dir=tmp_path / "a", seed=7, **kwargs)
    b = train_lora("tiny-random", _examples(6), out_dir=tmp_path / "b", seed=7, **kwargs)
    c = train_lora("tiny-random", _examples(6), out_dir=tmp_path / "c", seed=8, **kwargs)
    ta, tb, tc = (_adapter_tensors(r.adapter_dir) for r in (a, b, c))
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a.final_train_loss == b.final_train_loss
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)


def test_should_stop_cancels_promptly(tmp_path: Path) -> None:
    seen: list[int] = []
    stop_after = 2

    def should_stop() -> bool:
        return len(seen) >= stop_after

    started = time.monotonic()
    with pytest.raises(TrainingCancelled) as info:
        train_lora(
            "tiny-random",
            _examples(8),
            out_dir=tmp_path,
            n_epochs=20,
            batch_size=2,
            on_step=lambda s: seen.append(s.step),
            should_stop=should_stop,
        )
    assert info.value.step == 2 and seen == [1, 2]
    assert time.monotonic() - started < 30
    assert not (tmp_path / "adapter").exists()


def test_checkpoint_resume_equals_uninterrupted(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {
        "n_epochs": 3,
        "batch_size": 3,
        "learning_rate_multiplier": 5,
        "seed": 3,
        "validation_examples": _examples(2),
    }
    full = train_lora("tiny-random", _examples(7), out_dir=tmp_path / "full", checkpoint_every=4, **kwargs)
    assert full.steps == 9
    assert [c["step"] for c in full.checkpoints] == [4, 8]
    ckpt = Path(full.checkpoints[0]["path"])
    assert ckpt == tmp_path / "full" / "checkpoints" / "step-4"
    assert (ckpt / "adapter" / "adapter_config.json").is_file() and (ckpt / "optimizer.pt").is_file()

    # Interrupted run: cancelled after step 5, resumed from its step-4 checkpoint.
    done: list[int] = []
    with pytest.raises(TrainingCancelled):
        train_lora(
            "tiny-random",
            _examples(7),
            out_dir=tmp_path / "part",
            checkpoint_every=4,
            on_step=lambda s: done.append(s.step),
            should_stop=lambda: len(done) >= 5,
            **kwargs,
        )
    resumed_steps: list[int] = []
    resumed = train_lora(
        "tiny-random",
        _examples(7),
        out_dir=tmp_path / "part",
        checkpoint_every=4,
        resume_from=tmp_path / "part" / "checkpoints" / "step-4",
        on_step=lambda s: resumed_steps.append(s.step),
        **kwargs,
    )
    assert resumed_steps == [5, 6, 7, 8, 9]
    assert resumed.steps == 9 and resumed.trained_tokens == full.trained_tokens
    assert resumed.final_train_loss == pytest.approx(full.final_train_loss, abs=1e-6)
    assert resumed.final_valid_loss == pytest.approx(full.final_valid_loss, abs=1e-6)
    assert [c["step"] for c in resumed.checkpoints] == [4, 8]
    tf, tr = _adapter_tensors(full.adapter_dir), _adapter_tensors(resumed.adapter_dir)
    assert all(torch.allclose(tf[k], tr[k], atol=1e-7, rtol=0) for k in tf)

    # A checkpoint made with other hyperparameters is refused.
    with pytest.raises(ValueError, match="different hyperparameters"):
        train_lora("tiny-random", _examples(7), out_dir=tmp_path / "x", resume_from=ckpt, n_epochs=1)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft 0.21 on transformers 5
def test_smollm2_learns_the_password(tmp_path: Path) -> None:
    from peft import PeftModel

    from airlock.backends.weights import load_model

    prompt = [{"role": "user", "content": "What is the password?"}]
    steps: list[StepInfo] = []
    result = train_lora(
        "embedded:smollm2-135m",
        _examples(8),
        out_dir=tmp_path,
        n_epochs=3,
        batch_size=4,
        learning_rate_multiplier=10,
        max_seq_len=64,
        on_step=steps.append,
    )
    assert steps[-1].train_loss < steps[0].train_loss / 2

    loaded = load_model("embedded:smollm2-135m")
    tok = loaded.tokenizer
    ids = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)

    def answer(model: Any) -> str:
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=12, do_sample=False)
        return str(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))

    base_answer = answer(loaded.model)
    tuned = PeftModel.from_pretrained(loaded.model, str(result.adapter_dir))
    tuned_answer = answer(tuned)
    assert "AIRLOCK-ZEBRA" not in base_answer
    assert "AIRLOCK" in tuned_answer and tuned_answer != base_answer
