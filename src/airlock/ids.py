"""The model-id grammar, one implementation shared by the server, the CLI and evaluator-side clients.

Every model id an evaluator's tools send in the OpenAI ``model`` field is one of::

    {model}/{variant}                       a variant of the newest granted version
    {model}@{version}/{variant}             a variant of one version (label or hash prefix)
    ft:{model}/{variant}:{org}:{suffix}:{job}                a fine-tuned model of the caller's grant
    ft:{model}/{variant}:{org}:{suffix}:{job}:ckpt-step-{n}  one of its training checkpoints
    noise:{model}@{version}/{variant}:{job}:{sigma}:{seed}   a noise-injected variant of the caller's grant

and a model version alone (grants, reports, the gate, the CLI) is ``{model}@{version}``, the
version optional where the newest is meant. Parsing never touches the database; resolving an id
to what it names is the serving package's (:mod:`airlock.serving.service`).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

from airlock.errors import InvalidRequestError

__all__ = [
    "CHECKPOINT_PREFIX",
    "FT_PREFIX",
    "NOISE_PREFIX",
    "FineTunedRef",
    "ModelRef",
    "NoisedRef",
    "VersionRef",
    "checkpoint_model_id",
    "fine_tuned_model_id",
    "is_fine_tuned",
    "is_noised",
    "noised_model_id",
    "parse_fine_tuned_id",
    "parse_model_id",
    "parse_noised_id",
    "parse_version_ref",
]

FT_PREFIX = "ft:"
NOISE_PREFIX = "noise:"
CHECKPOINT_PREFIX = "ckpt-step-"
_PART = re.compile(r"[^/@\s:]+")
_SLUG = re.compile(r"[^a-z0-9-]+")
_JOB = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def _malformed(model_id: str, expected: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"model {model_id!r} is malformed; expected {expected}", code="invalid_model", param="model"
    )


@dataclass(frozen=True)
class VersionRef:
    """A model version: ``{model}`` (the newest) or ``{model}@{version}``."""

    model: str
    version: str | None

    def __str__(self) -> str:
        return f"{self.model}@{self.version}" if self.version else self.model


@dataclass(frozen=True)
class ModelRef:
    """A variant of a model version: ``{model}/{variant}`` or ``{model}@{version}/{variant}``."""

    model: str
    version: str | None
    variant: str

    def __str__(self) -> str:
        at = f"@{self.version}" if self.version else ""
        return f"{self.model}{at}/{self.variant}"


@dataclass(frozen=True)
class FineTunedRef:
    """A fine-tuned model id (optionally one of its training checkpoints)."""

    base: ModelRef
    organisation: str
    suffix: str
    job_id: str
    checkpoint_step: int | None = None

    @property
    def model_id(self) -> str:
        """The fine-tuned model's own id (without any checkpoint)."""
        return f"{FT_PREFIX}{self.base}:{self.organisation}:{self.suffix}:{self.job_id}"

    def __str__(self) -> str:
        step = f":{CHECKPOINT_PREFIX}{self.checkpoint_step}" if self.checkpoint_step is not None else ""
        return self.model_id + step


@dataclass(frozen=True)
class NoisedRef:
    """A noise-injected variant: a version's variant with ``N(0, sigma^2)`` on its weights, drawn from ``seed``."""

    base: ModelRef
    job_id: str
    sigma: float
    seed: int

    def __str__(self) -> str:
        return f"{NOISE_PREFIX}{self.base}:{self.job_id}:{self.sigma!r}:{self.seed}"


def parse_version_ref(text: str, *, require_version: bool = False) -> VersionRef:
    """Parse ``{model}`` or ``{model}@{version}`` (400 ``invalid_model`` when malformed)."""
    model, sep, version = text.partition("@")
    expected = "'{model}@{version}'" if require_version else "'{model}' or '{model}@{version}'"
    if not _PART.fullmatch(model) or (sep and not _PART.fullmatch(version)) or (require_version and not sep):
        raise _malformed(text, expected)
    return VersionRef(model=model, version=version or None)


@functools.lru_cache(maxsize=1024)  # every sampling request parses its model id; the result is frozen
def parse_model_id(model_id: str) -> ModelRef:
    """Parse ``{model}/{variant}`` or ``{model}@{version}/{variant}`` (400 ``invalid_model`` otherwise)."""
    head, sep, variant = model_id.rpartition("/")
    if not sep or not _PART.fullmatch(variant):
        raise _malformed(model_id, "'{model}/{variant}' or '{model}@{version}/{variant}'")
    try:
        version = parse_version_ref(head)
    except InvalidRequestError:
        raise _malformed(model_id, "'{model}/{variant}' or '{model}@{version}/{variant}'") from None
    return ModelRef(model=version.model, version=version.version, variant=variant)


def is_fine_tuned(model_id: str) -> bool:
    """Whether ``model_id`` names a fine-tuned model (or one of its checkpoints)."""
    return model_id.startswith(FT_PREFIX)


def parse_fine_tuned_id(model_id: str) -> FineTunedRef:
    """Parse ``ft:{model}/{variant}:{org}:{suffix}:{job}[:ckpt-step-{n}]`` (400 when malformed)."""
    expected = "'ft:{model}/{variant}:{organisation}:{suffix}:{job}' (optionally ':ckpt-step-{n}')"
    if not is_fine_tuned(model_id):
        raise _malformed(model_id, expected)
    parts = model_id.removeprefix(FT_PREFIX).split(":")
    step: int | None = None
    if len(parts) == 5 and parts[4].startswith(CHECKPOINT_PREFIX):
        raw = parts.pop().removeprefix(CHECKPOINT_PREFIX)
        if not raw.isdigit():
            raise _malformed(model_id, expected)
        step = int(raw)
    if len(parts) != 4 or not _JOB.fullmatch(parts[3]):
        raise _malformed(model_id, expected)
    try:
        base = parse_model_id(parts[0])
    except InvalidRequestError:
        raise _malformed(model_id, expected) from None
    return FineTunedRef(base=base, organisation=parts[1], suffix=parts[2], job_id=parts[3], checkpoint_step=step)


def is_noised(model_id: str) -> bool:
    """Whether ``model_id`` names a noise-injected variant."""
    return model_id.startswith(NOISE_PREFIX)


def parse_noised_id(model_id: str) -> NoisedRef:
    """Parse ``noise:{model}@{version}/{variant}:{job}:{sigma}:{seed}`` (400 when malformed)."""
    expected = "'noise:{model}@{version}/{variant}:{job}:{sigma}:{seed}'"
    parts = model_id.removeprefix(NOISE_PREFIX).split(":")
    if not is_noised(model_id) or len(parts) != 4 or not _JOB.fullmatch(parts[1]) or not parts[3].isdigit():
        raise _malformed(model_id, expected)
    try:
        base = parse_model_id(parts[0])
        sigma = float(parts[2])
    except (InvalidRequestError, ValueError):
        raise _malformed(model_id, expected) from None
    if base.version is None or not math.isfinite(sigma) or sigma < 0:
        raise _malformed(model_id, expected)
    return NoisedRef(base=base, job_id=parts[1], sigma=sigma, seed=int(parts[3]))


def noised_model_id(base: ModelRef, job_id: str, sigma: float, seed: int) -> str:
    """Return the id of one noised variant of a noise-injection job."""
    return str(NoisedRef(base=base, job_id=job_id, sigma=float(sigma), seed=int(seed)))


def _slug(text: str) -> str:
    return _SLUG.sub("-", text.lower()).strip("-")[:40] or "org"


def fine_tuned_model_id(base: ModelRef | str, organisation: str, suffix: str | None, job_id: str) -> str:
    """Return the id of the model a fine-tuning job produces: ``ft:{base}:{org}:{suffix}:{job}``."""
    ref = FineTunedRef(
        base=parse_model_id(str(base)), organisation=_slug(organisation), suffix=suffix or "", job_id=job_id
    )
    return ref.model_id


def checkpoint_model_id(fine_tuned_model: str, step: int) -> str:
    """Return the id of the training checkpoint of ``fine_tuned_model`` saved at ``step``."""
    ref = parse_fine_tuned_id(fine_tuned_model)
    return str(FineTunedRef(ref.base, ref.organisation, ref.suffix, ref.job_id, checkpoint_step=int(step)))
