"""LoRA supervised fine-tuning with peft on OpenAI chat-format examples.

Everything runs on the calling thread: the job worker is a long-lived thread, and one torch thread
per kind of work keeps OpenMP pools from outnumbering the cores (docs/architecture.md).

``"auto"`` hyperparameters (the resolved values are reported in :attr:`TrainResult.hyperparameters`):

- ``n_epochs``: like OpenAI, 3 by default, raised so that a small file is seen at least ~100 times
  in all and lowered so that a large one is seen at most ~25,000 times, clamped to 1..25.
- ``batch_size``: ``ceil(n / 10)`` clamped to 1..8 (small files get small batches, hence enough steps).
- ``learning_rate_multiplier``: 1.0, times a base learning rate of 2e-4 (a usual LoRA rate for a
  small model with AdamW).

Determinism: LoRA initialisation is seeded, LoRA dropout is 0 and each epoch's order is a
permutation drawn from a generator seeded with ``seed`` and the epoch, so the same inputs give the
same adapter, and a resumed run reaches the same adapter as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airlock.atomicfile import build_directory_atomically
from airlock.backends import weights
from airlock.finetune.adapters import adapter_dir_sha256

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "LORA_BASE_LEARNING_RATE",
    "LORA_TARGET_MODULES",
    "EncodedExample",
    "StepInfo",
    "TrainResult",
    "TrainingCancelled",
    "encode_example",
    "resolve_hyperparameters",
    "result_dict",
    "train_lora",
    "training_dtype",
    "validate_examples",
]

#: Attention and MLP projections of the Llama architecture (SmolLM2 and tiny-random).
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_BASE_LEARNING_RATE = 2e-4
_ROLES = frozenset({"system", "user", "assistant", "developer"})
_MIN_TARGET_EXAMPLES = 100
_MAX_TARGET_EXAMPLES = 25_000
_DEFAULT_EPOCHS = 3


class TrainingCancelled(Exception):
    """Raised when ``should_stop()`` asked training to stop."""

    def __init__(self, step: int) -> None:
        super().__init__(f"training cancelled after step {step}")
        self.step = step


@dataclass(frozen=True)
class StepInfo:
    """Progress after one optimizer step."""

    step: int
    total_steps: int
    epoch: int
    train_loss: float
    valid_loss: float | None
    elapsed_s: float


@dataclass
class TrainResult:
    """What a finished training run produced."""

    adapter_dir: Path
    steps: int
    trained_tokens: int
    final_train_loss: float
    final_valid_loss: float | None
    hyperparameters: dict[str, Any]
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    adapter_sha256: str = ""


@dataclass(frozen=True)
class EncodedExample:
    """One tokenized example: ``labels`` are -100 except on trained assistant tokens."""

    input_ids: list[int]
    labels: list[int]


# ---------------------------------------------------------------- data


def validate_examples(examples: Sequence[Any], what: str = "example") -> None:
    """Raise ValueError naming the first malformed example (index from 0)."""
    if not examples:
        raise ValueError(f"no {what}s: at least one is needed")
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or not isinstance(ex.get("messages"), list) or not ex["messages"]:
            raise ValueError(f"{what} {i}: expected an object with a non-empty 'messages' list")
        has_assistant = False
        for j, msg in enumerate(ex["messages"]):
            if not isinstance(msg, dict) or msg.get("role") not in _ROLES:
                raise ValueError(f"{what} {i}, message {j}: role must be one of {', '.join(sorted(_ROLES))}")
            if not isinstance(msg.get("content"), str):
                raise ValueError(f"{what} {i}, message {j}: content must be a string")
            if msg.get("weight", 1) not in (0, 1):
                raise ValueError(f"{what} {i}, message {j}: weight must be 0 or 1")
            has_assistant = has_assistant or (msg["role"] == "assistant" and msg.get("weight", 1) == 1)
        if not has_assistant:
            raise ValueError(f"{what} {i}: has no assistant message to train on")


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    assert isinstance(text, str)
    return text


def encode_example(
    tokenizer: PreTrainedTokenizerBase, example: dict[str, Any], max_seq_len: int, index: int = 0
) -> EncodedExample:
    """Tokenize ``example`` with the chat template; only assistant tokens (weight 1) get labels."""
    messages = [{"role": m["role"], "content": m["content"]} for m in example["messages"]]
    text = _render(tokenizer, messages, prompt=False)
    # Character spans of the trained assistant turns: the text a turn adds after its generation
    # prompt (its content and end-of-turn marker). Needs a prefix-stable template (ChatML is).
    spans: list[tuple[int, int]] = []
    for k, msg in enumerate(example["messages"]):
        if msg["role"] != "assistant" or msg.get("weight", 1) == 0:
            continue
        start = len(_render(tokenizer, messages[:k], prompt=True))
        end = len(_render(tokenizer, messages[: k + 1], prompt=False))
        if not text.startswith(_render(tokenizer, messages[: k + 1], prompt=False)) or end <= start:
            raise ValueError(f"example {index}: the chat template does not render turns as prefixes")
        spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    ids: list[int] = list(enc["input_ids"])[:max_seq_len]
    offsets: list[tuple[int, int]] = list(enc["offset_mapping"])[:max_seq_len]
    labels = [tid if any(s <= a < e for s, e in spans) else -100 for tid, (a, _b) in zip(ids, offsets, strict=True)]
    if all(label == -100 for label in labels):
        raise ValueError(f"example {index}: no assistant tokens within max_seq_len={max_seq_len}")
    return EncodedExample(input_ids=ids, labels=labels)


def _collate(batch: list[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad one batch to its longest example (pads are masked and never labelled)."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, e in enumerate(batch):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        labels[r, :n] = torch.tensor(e.labels)
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _to(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return batch if device == "cpu" else {k: v.to(device) for k, v in batch.items()}


def training_dtype(device: str) -> str:
    """Return the dtype LoRA training loads the base weights in on ``device``: bf16 on a GPU that has it."""
    if not device.startswith("cuda"):
        return "float32"
    import torch

    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


# ---------------------------------------------------------------- hyperparameters


def resolve_hyperparameters(
    n_examples: int,
    n_epochs: int | str = "auto",
    batch_size: int | str = "auto",
    learning_rate_multiplier: float | str = "auto",
) -> dict[str, Any]:
    """Resolve ``"auto"`` values (rules in the module docstring); validate explicit ones."""
    if n_examples < 1:
        raise ValueError("at least one training example is needed")
    if n_epochs == "auto":
        epochs = _DEFAULT_EPOCHS
        if n_examples * epochs < _MIN_TARGET_EXAMPLES:
            epochs = min(25, math.ceil(_MIN_TARGET_EXAMPLES / n_examples))
        elif n_examples * epochs > _MAX_TARGET_EXAMPLES:
            epochs = max(1, _MAX_TARGET_EXAMPLES // n_examples)
    elif isinstance(n_epochs, int) and not isinstance(n_epochs, bool) and 1 <= n_epochs <= 50:
        epochs = n_epochs
    else:
        raise ValueError(f"n_epochs must be 'auto' or an integer in 1..50, not {n_epochs!r}")
    if batch_size == "auto":
        batch = max(1, min(8, math.ceil(n_examples / 10)))
    elif isinstance(batch_size, int) and not isinstance(batch_size, bool) and 1 <= batch_size <= 256:
        batch = batch_size
    else:
        raise ValueError(f"batch_size must be 'auto' or an integer in 1..256, not {batch_size!r}")
    if learning_rate_multiplier == "auto":
        multiplier = 1.0
    elif (
        isinstance(learning_rate_multiplier, int | float)
        and not isinstance(learning_rate_multiplier, bool)
        and 0 < learning_rate_multiplier <= 100
    ):
        multiplier = float(learning_rate_multiplier)
    else:
        raise ValueError(
            f"learning_rate_multiplier must be 'auto' or a number in (0, 100], not {learning_rate_multiplier!r}"
        )
    return {
        "n_epochs": epochs,
        "batch_size": batch,
        "learning_rate_multiplier": multiplier,
        "learning_rate": LORA_BASE_LEARNING_RATE * multiplier,
    }


# ---------------------------------------------------------------- atomic writes


# ---------------------------------------------------------------- training


@contextlib.contextmanager
def _peft_deprecations_silenced() -> Iterator[None]:
    """Silence a transformers 5 deprecation that peft 0.21 triggers (not ours to fix)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _save_adapter(model: Any, directory: Path) -> None:
    """``save_pretrained`` the LoRA weights (adapter config + safetensors)."""
    with _peft_deprecations_silenced():
        model.save_pretrained(directory)


def _order(n: int, seed: int, epoch: int) -> list[int]:
    """Return epoch ``epoch``'s example order: a function of (seed, epoch) only, so resume is exact."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return [int(i) for i in torch.randperm(n, generator=gen)]


def _mean_loss(model: Any, batches: list[dict[str, torch.Tensor]], should_stop: Callable[[], bool], step: int) -> float:
    """Token-weighted mean loss over ``batches`` (no gradients)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            if should_stop():
                raise TrainingCancelled(step)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
    return total / max(count, 1)


def train_lora(
    base_model: str,
    train_examples: list[dict[str, Any]],
    *,
    out_dir: Path,
    validation_examples: list[dict[str, Any]] | None = None,
    n_epochs: int | str = "auto",
    batch_size: int | str = "auto",
    learning_rate_multiplier: float | str = "auto",
    seed: int = 0,
    max_seq_len: int = 512,
    lora_r: int = 8,
    on_step: Callable[[StepInfo], None] | None = None,
    on_checkpoint: Callable[[int, Path], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume_from: Path | None = None,
    checkpoint_every: int = 0,
    num_threads: int | None = None,
    device: str = "cpu",
) -> TrainResult:
    """Fine-tune a LoRA adapter on ``base_model`` (a weights spec) and save it in ``out_dir/adapter``.

    Validation loss is computed at the end of every epoch. ``should_stop`` is polled before every
    step (and validation batch) and raises :class:`TrainingCancelled`. With ``checkpoint_every``
    > 0, ``out_dir/checkpoints/step-N/`` holds the adapter, optimizer and RNG state every N steps;
    ``resume_from`` continues from such a directory; ``on_checkpoint(step, path)`` is called once each
    is complete on disk, so the caller can record it as the one to resume from. ``num_threads`` sets this thread's torch
    thread count (default: leave torch's choice). ``device`` places the model and batches (``cuda`` trains in
    bfloat16 where the GPU supports it, float32 otherwise).
    """
    import safetensors.torch
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    started = time.monotonic()
    stop = should_stop or (lambda: False)
    validate_examples(train_examples)
    if validation_examples:
        validate_examples(validation_examples, "validation example")
    if checkpoint_every < 0:
        raise ValueError("checkpoint_every must be >= 0")
    hp = resolve_hyperparameters(len(train_examples), n_epochs, batch_size, learning_rate_multiplier)
    hp.update(seed=seed, max_seq_len=max_seq_len, lora_r=lora_r)
    if num_threads is not None:
        torch.set_num_threads(num_threads)

    loaded = weights.load_model(base_model, device=device, dtype=training_dtype(device))
    tokenizer = loaded.tokenizer
    train = [encode_example(tokenizer, ex, max_seq_len, i) for i, ex in enumerate(train_examples)]
    valid = [encode_example(tokenizer, ex, max_seq_len, i) for i, ex in enumerate(validation_examples or [])]
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    bsz: int = hp["batch_size"]
    steps_per_epoch = math.ceil(len(train) / bsz)
    total_steps = steps_per_epoch * hp["n_epochs"]
    valid_batches = [_to(_collate(valid[i : i + bsz], pad_id), device) for i in range(0, len(valid), bsz)]

    config = LoraConfig(
        r=lora_r,
        lora_alpha=2 * lora_r,
        lora_dropout=0.0,  # no dropout: no RNG in the step, so runs and resumes are exactly reproducible
        target_modules=list(LORA_TARGET_MODULES),
        task_type="CAUSAL_LM",
    )
    # Seed only inside fork_rng: the caller's (and other jobs') global RNG stream stays untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _peft_deprecations_silenced():
            model: Any = get_peft_model(loaded.model, config)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp["learning_rate"], weight_decay=0.0)

        step, trained_tokens = 0, 0
        train_loss = float("nan")
        valid_loss: float | None = None
        checkpoints: list[dict[str, Any]] = []
        if resume_from is not None:
            state = json.loads((resume_from / "state.json").read_text())
            if state["hyperparameters"] != hp:
                raise ValueError(f"checkpoint {resume_from} was made with different hyperparameters")
            lora = safetensors.torch.load_file(str(resume_from / "adapter" / "adapter_model.safetensors"))
            set_peft_model_state_dict(model, lora)
            optimizer.load_state_dict(torch.load(resume_from / "optimizer.pt", weights_only=True))
            torch.set_rng_state(torch.load(resume_from / "rng.pt", weights_only=True))
            step, trained_tokens = int(state["step"]), int(state["trained_tokens"])
            train_loss, valid_loss = float(state["train_loss"]), state["valid_loss"]
            checkpoints = list(state["checkpoints"])

        def checkpoint() -> None:
            final = out_dir / "checkpoints" / f"step-{step}"
            entry = {"step": step, "train_loss": train_loss, "valid_loss": valid_loss, "path": str(final)}

            def build(tmp: Path) -> None:
                _save_adapter(model, tmp / "adapter")
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(torch.get_rng_state(), tmp / "rng.pt")
                body = {
                    "step": step,
                    "trained_tokens": trained_tokens,
                    "train_loss": train_loss,
                    "valid_loss": valid_loss,
                    "hyperparameters": hp,
                    "checkpoints": [*checkpoints, entry],
                }
                (tmp / "state.json").write_text(json.dumps(body, indent=2))

            build_directory_atomically(final, build, replace=True)
            checkpoints.append(entry)
            if on_checkpoint is not None:
                on_checkpoint(step, final)

        while step < total_steps:
            epoch, index = divmod(step, steps_per_epoch)
            order = _order(len(train), seed, epoch)
            chunk = [train[i] for i in order[index * bsz : (index + 1) * bsz]]
            if stop():
                raise TrainingCancelled(step)
            batch = _to(_collate(chunk, pad_id), device)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            train_loss = float(loss.detach())
            trained_tokens += int(batch["attention_mask"].sum())
            if step % steps_per_epoch == 0 and valid_batches:
                model.eval()
                valid_loss = _mean_loss(model, valid_batches, stop, step)
                model.train()
            if on_step is not None:
                on_step(StepInfo(step, total_steps, epoch + 1, train_loss, valid_loss, time.monotonic() - started))
            if checkpoint_every and step % checkpoint_every == 0 and step < total_steps:
                checkpoint()

        adapter_dir = out_dir / "adapter"
        model.eval()
        build_directory_atomically(adapter_dir, lambda tmp: _save_adapter(model, tmp), replace=True)
    return TrainResult(
        adapter_dir=adapter_dir,
        steps=step,
        trained_tokens=trained_tokens,
        final_train_loss=train_loss,
        final_valid_loss=valid_loss,
        hyperparameters=hp,
        checkpoints=checkpoints,
        adapter_sha256=adapter_dir_sha256(adapter_dir),
    )


def result_dict(result: TrainResult) -> dict[str, Any]:
    """Return ``result`` as JSON-serialisable data."""
    body = asdict(result)
    body["adapter_dir"] = str(result.adapter_dir)
    return body
