"""Variant mitigations: the kinds a manifest can declare, and the registry that builds them.

A variant (``production``, ``helpful-only``, ...) declares an ordered list of mitigations,
each ``{name, kind, config, stance}``. Three kinds act at request time:

* ``system_prompt`` adds the lab's system prompt to chat requests (``prepend`` or ``replace``);
* ``input_filter`` screens what the client sent and refuses without calling the model;
* ``output_filter`` screens each generated choice and replaces blocked ones with a refusal.

Every other kind (``harmlessness_training``, ``rate_limit``, ``monitoring``, or one Airlock
does not know) is *declarative*: recorded for governance, no runtime effect here. The
``stance`` of a mitigation is governance metadata and is not read by this module.

Each check yields a :class:`Verdict`; the pipeline (:mod:`airlock.mitigations.pipeline`) returns
the verdicts of every call to its caller, so every decision is audited.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from airlock.backends.protocol import (
    ChatCompletionRequest,
    ChatMessage,
)
from airlock.errors import ConfigError
from airlock.mitigations.classifiers import Classifier, PatternClassifier, build_classifier, run_inference
from airlock.registry.schemas import Manifest

logger = logging.getLogger(__name__)

Stage = Literal["input", "output"]
_M = TypeVar("_M", bound=BaseModel)

#: Refusal returned in place of blocked content when a filter names no message of its own.
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that request."


@dataclass(frozen=True)
class Verdict:
    """The outcome of one mitigation check, recorded in the audit trail."""

    mitigation: str
    kind: str
    stage: Stage
    blocked: bool
    reason: str
    score: float | None = None


# ---------------------------------------------------------------- base and registry


class Mitigation:
    """One mitigation of a variant; every hook defaults to doing nothing."""

    #: Registry name used in the manifest (``kind: input_filter``).
    kind: ClassVar[str] = ""
    #: Whether the mitigation acts on requests (``False``: recorded for governance only).
    runtime: ClassVar[bool] = False
    #: Whether :meth:`check_input` / :meth:`check_output` do anything (lets the pipeline skip work).
    inspects_input: ClassVar[bool] = False
    inspects_output: ClassVar[bool] = False

    def __init__(self, name: str, config: Mapping[str, Any] | None = None) -> None:
        self.name = name
        #: The normalized configuration, as recorded for governance.
        self.config: dict[str, Any] = dict(config or {})
        #: Text returned to the client in place of content this mitigation blocks.
        self.refusal_message: str = DEFAULT_REFUSAL

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any]) -> Mitigation:
        """Build the mitigation from its manifest ``config``; raise ``ConfigError`` when it is invalid."""
        if config:
            raise ConfigError(f"mitigation {name!r} ({cls.kind}) takes no config, got: {', '.join(sorted(config))}")
        return cls(name)

    async def start(self) -> None:
        """Load models or other resources before the first request (default: nothing)."""

    def transform_chat(self, request: ChatCompletionRequest) -> ChatCompletionRequest:
        """Return the chat request to send on (default: unchanged)."""
        return request

    async def check_input(self, texts: list[str]) -> Verdict | None:
        """Screen the client's input texts; ``None`` means this mitigation does not screen input."""
        return None

    async def check_output(self, text: str) -> Verdict | None:
        """Screen one generated text; ``None`` means this mitigation does not screen output."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r})"


_MITIGATIONS: dict[str, type[Mitigation]] = {}


def register_mitigation(kind: str, cls: type[Mitigation]) -> None:
    """Register ``cls`` as the implementation of mitigations of type ``kind``."""
    if not kind:
        raise ValueError("mitigation kind must be non-empty")
    _MITIGATIONS[kind] = cls


def mitigation_kinds() -> list[str]:
    """Return the registered mitigation kinds, sorted."""
    return sorted(_MITIGATIONS)


def build_mitigation(name: str, kind: str, config: Mapping[str, Any] | None = None) -> Mitigation:
    """Instantiate a mitigation; unknown kinds become declarative, runtime kinds are validated strictly."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"mitigation name must be a non-empty string, got {name!r}")
    if not isinstance(kind, str) or not kind.strip():
        raise ConfigError(f"mitigation {name!r}: kind must be a non-empty string, got {kind!r}")
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise ConfigError(f"mitigation {name!r} ({kind}): config must be a mapping, got {type(config).__name__}")
    cls = _MITIGATIONS.get(kind)
    if cls is None:
        # An unknown kind is still a claim a lab makes about its deployment; it is recorded for
        # governance but cannot be enforced here.
        logger.info("mitigation %r has kind %r, unknown to Airlock: recorded as declarative", name, kind)
        cls = _declarative_class(kind)
    return cls.from_config(name, config)


def _validate(model: type[_M], name: str, kind: str, config: Mapping[str, Any]) -> _M:
    try:
        return model.model_validate(dict(config))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"mitigation {name!r} ({kind}): invalid config: {problems}") from None


class _StrictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- declarative kinds


class DeclarativeMitigation(Mitigation):
    """A mitigation with no runtime effect (training, rate limits, monitoring): recorded for governance."""

    runtime = False

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any]) -> Mitigation:
        """Accept any configuration; it is recorded verbatim."""
        return cls(name, config)


class HarmlessnessTraining(DeclarativeMitigation):
    """The model was trained to refuse harmful requests (a property of the weights)."""

    kind = "harmlessness_training"


class RateLimitMitigation(DeclarativeMitigation):
    """Deployment rate limits; enforced by the gateway's quotas, not by the pipeline."""

    kind = "rate_limit"


class MonitoringMitigation(DeclarativeMitigation):
    """Post-hoc monitoring of traffic; recorded for governance."""

    kind = "monitoring"


@cache
def _declarative_class(kind: str) -> type[Mitigation]:
    # One subclass per unknown kind so instances report the kind the manifest declared.
    return type(f"Declarative[{kind}]", (DeclarativeMitigation,), {"kind": kind, "__doc__": f"Declared {kind}."})


# ---------------------------------------------------------------- system prompt


class SystemPromptConfig(_StrictConfig):
    """Configuration of a ``system_prompt`` mitigation."""

    prompt: str = Field(min_length=1)
    mode: Literal["prepend", "replace"] = "prepend"

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value


class SystemPrompt(Mitigation):
    """Adds the lab's system prompt to chat requests.

    ``prepend`` merges the prompt in front of a leading client system/developer message, or
    inserts a system message first when there is none. ``replace`` drops every client
    system/developer message and puts the lab's prompt first.
    """

    kind = "system_prompt"
    runtime = True

    def __init__(self, name: str, settings: SystemPromptConfig) -> None:
        super().__init__(name, settings.model_dump())
        self.settings = settings

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any]) -> Mitigation:
        """Validate ``prompt`` and ``mode``."""
        return cls(name, _validate(SystemPromptConfig, name, cls.kind, config))

    def transform_chat(self, request: ChatCompletionRequest) -> ChatCompletionRequest:
        """Return ``request`` with the system prompt applied."""
        prompt = self.settings.prompt
        messages = list(request.messages)
        if self.settings.mode == "replace":
            kept = [m for m in messages if m.role not in ("system", "developer")]
            messages = [ChatMessage(role="system", content=prompt), *kept]
        elif messages and messages[0].role in ("system", "developer"):
            first = messages[0]
            client_text = first.text()
            merged = f"{prompt}\n\n{client_text}" if client_text else prompt
            messages = [first.model_copy(update={"content": merged}), *messages[1:]]
        else:
            messages = [ChatMessage(role="system", content=prompt), *messages]
        return request.model_copy(update={"messages": messages})


# ---------------------------------------------------------------- filters


class FilterConfig(_StrictConfig):
    """Configuration of an ``input_filter`` or ``output_filter`` mitigation."""

    patterns: list[str] = Field(default_factory=list, description="Case-insensitive regular expressions.")
    classifier: str | None = Field(default=None, description="'embedding', 'none' or a registered classifier.")
    exemplars: list[str] = Field(default_factory=list, description="Descriptions of disallowed content.")
    threshold: float = Field(default=0.6, gt=0.0, le=1.0, description="Block at or above this classifier score.")
    refusal_message: str = Field(default=DEFAULT_REFUSAL, min_length=1)
    classifier_options: dict[str, Any] = Field(default_factory=dict, description="Passed to a custom classifier.")

    @field_validator("patterns")
    @classmethod
    def _compile_patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not pattern:
                raise ValueError("patterns must be non-empty (an empty pattern matches everything)")
            try:
                re.compile(pattern, re.IGNORECASE)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
        return value

    @field_validator("exemplars")
    @classmethod
    def _exemplars_not_blank(cls, value: list[str]) -> list[str]:
        if any(not e.strip() for e in value):
            raise ValueError("exemplars must be non-empty strings")
        return value

    def classifier_name(self) -> str:
        """Return the effective classifier: the configured one, else ``embedding`` with exemplars, else ``none``."""
        if self.classifier is not None:
            return self.classifier
        return "embedding" if self.exemplars else "none"


class _ContentFilter(Mitigation):
    """Shared logic of the input and output filters: patterns first, then the classifier."""

    runtime = True
    stage: ClassVar[Stage]

    def __init__(self, name: str, settings: FilterConfig, classifier: Classifier | None) -> None:
        super().__init__(name, settings.model_dump())
        self.settings = settings
        self.refusal_message = settings.refusal_message
        self.patterns = PatternClassifier(settings.patterns) if settings.patterns else None
        self.classifier = classifier

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any]) -> Mitigation:
        """Validate the filter and build its classifier (the model itself loads lazily)."""
        settings = _validate(FilterConfig, name, cls.kind, config)
        classifier_name = settings.classifier_name()
        prefix = f"mitigation {name!r} ({cls.kind})"
        classifier: Classifier | None = None
        if classifier_name == "none":
            if settings.exemplars:
                raise ConfigError(f"{prefix}: exemplars are given but classifier is 'none'")
            if settings.classifier_options:
                raise ConfigError(f"{prefix}: classifier_options are given but classifier is 'none'")
            if not settings.patterns:
                raise ConfigError(f"{prefix}: nothing to check; give patterns, exemplars or a classifier")
        else:
            try:
                classifier = build_classifier(classifier_name, settings.exemplars, settings.classifier_options)
            except ConfigError as exc:
                raise ConfigError(f"{prefix}: {exc.message}") from None
        return cls(name, settings, classifier)

    async def start(self) -> None:
        """Load the classifier's model so the first request does not pay for it."""
        if self.classifier is not None:
            await run_inference(self.classifier.load)

    def _verdict(self, blocked: bool, reason: str, score: float | None) -> Verdict:
        return Verdict(
            mitigation=self.name, kind=self.kind, stage=self.stage, blocked=blocked, reason=reason, score=score
        )

    async def _check(self, texts: list[str]) -> Verdict:
        texts = [t for t in texts if t]
        if self.patterns is not None:
            for value, reason in self.patterns.score(texts):
                if value >= 1.0:
                    return self._verdict(True, reason, value)
        if self.classifier is None or not texts:
            return self._verdict(False, "no pattern matched" if texts else "no text", None)
        scores = await self.classifier.ascore(texts)
        value, reason = max(scores, key=lambda s: s[0] if math.isfinite(s[0]) else math.inf)
        # "not below" rather than ">=": a NaN score from a broken classifier blocks (fail closed).
        blocked = not value < self.settings.threshold
        return self._verdict(blocked, reason, value)


class InputFilter(_ContentFilter):
    """Refuses requests whose client-supplied text matches a pattern or scores above the threshold."""

    kind = "input_filter"
    stage = "input"
    inspects_input = True

    async def check_input(self, texts: list[str]) -> Verdict | None:
        """Screen the client's texts."""
        return await self._check(texts)


class OutputFilter(_ContentFilter):
    """Replaces generated choices that match a pattern or score above the threshold with a refusal."""

    kind = "output_filter"
    stage = "output"
    inspects_output = True

    async def check_output(self, text: str) -> Verdict | None:
        """Screen one generated text."""
        return await self._check([text])


for _cls in (SystemPrompt, InputFilter, OutputFilter, HarmlessnessTraining, RateLimitMitigation, MonitoringMitigation):
    register_mitigation(_cls.kind, _cls)


def check_manifest(manifest: Manifest) -> None:
    """Build every mitigation a manifest declares, so a bad config fails at sync, not at first request."""
    for model in manifest.models:
        for version in model.versions:
            for variant in version.variants:
                for m in variant.mitigations:
                    try:
                        build_mitigation(m.name, m.kind, m.config)
                    except ConfigError as exc:
                        where = f"{model.name}@{version.label or version.content_hash or '?'}/{variant.name}"
                        raise ConfigError(f"{where}: {exc.message}") from None
