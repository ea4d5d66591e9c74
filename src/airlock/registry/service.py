"""Registry logic: manifest loading and sync, model-id parsing, version and variant lookup."""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from airlock.db import utcnow
from airlock.errors import ConfigError, ConflictError, InvalidRequestError, NotFoundError
from airlock.ids import ModelRef
from airlock.registry import events as registry_events
from airlock.registry.models import Mitigation, Model, ModelVersion, StageChange, Variant
from airlock.registry.schemas import (
    LOCAL_DEFAULT_CONTEXT,
    Manifest,
    ModelSpec,
    SyncReport,
    VariantSpec,
    VersionSpec,
)
from airlock.registry.weights import weights_content_hash

log = logging.getLogger(__name__)

#: A version may be named by a prefix of its content hash: lowercase hex, long enough to be meant.
HASH_PREFIX_RE = re.compile(r"[0-9a-f]{8,64}")
#: Output cap of a variant whose manifest and backend name none.
DEFAULT_MAX_OUTPUT_TOKENS = 4096


def format_validation_error(exc: ValidationError) -> str:
    """Render a pydantic error as one readable line per problem, with the location of each."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        lines.append(f"{loc}: {err['msg']}")
    return "; ".join(lines)


def load_manifest(path: Path) -> Manifest:
    """Read and validate a lab manifest file."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"manifest {path} does not exist; run `airlock init` to create one") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"manifest {path} is not valid YAML: {exc}") from None
    return parse_manifest(raw, source=str(path))


def parse_manifest(raw: Any, *, source: str = "manifest") -> Manifest:
    """Validate a manifest given as plain data."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with a `models` list")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source} is invalid: {format_validation_error(exc)}") from None


def version_hash(spec: VersionSpec) -> str:
    """Return the content hash of a version: explicit, or computed from its weights."""
    if spec.content_hash:
        return spec.content_hash
    assert spec.weights is not None  # guaranteed by VersionSpec validation
    return weights_content_hash(spec.weights)


def sync_manifest(session: Session, manifest: Manifest, *, actor: str = "manifest") -> SyncReport:
    """Create or update every model, version, variant and mitigation the manifest declares.

    Sync is additive: objects absent from the manifest are kept, since grants and results may
    refer to them. A version label may never be re-pointed at different weights. The registry
    stores mitigation configs as declared; what they mean is the mitigations package's, so every
    entry point checks them first (``airlock.mitigations.check_manifest``).
    """
    report = SyncReport()
    for model_spec in manifest.models:
        _sync_model(session, model_spec, report, actor)
    session.flush()
    return report


def _sync_model(session: Session, spec: ModelSpec, report: SyncReport, actor: str) -> None:
    model = session.scalar(select(Model).where(Model.name == spec.name))
    if model is None:
        model = Model(name=spec.name, description=spec.description)
        session.add(model)
        session.flush()
        report.created.append(f"model {spec.name}")
    elif model.description != spec.description:
        model.description = spec.description
        report.updated.append(f"model {spec.name}")
    for version_spec in spec.versions:
        _sync_version(session, model, version_spec, report, actor)


def _sync_version(session: Session, model: Model, spec: VersionSpec, report: SyncReport, actor: str) -> None:
    content_hash = version_hash(spec)
    label = spec.label or content_hash[:12]
    where = f"{model.name}@{label}"
    by_label = session.scalar(
        select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.label == label)
    )
    by_hash = session.scalar(
        select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.content_hash == content_hash)
    )
    if by_label is not None and by_label.content_hash != content_hash:
        raise ConflictError(
            f"{where}: the label already names weights {by_label.content_hash[:12]}…, not {content_hash[:12]}…; "
            "give the new weights a new label"
        )
    if by_label is None and by_hash is not None:
        raise ConflictError(f"{where}: these weights are already registered as {model.name}@{by_hash.label}")
    version = by_label
    if version is None:
        version = ModelVersion(model_id=model.id, label=label, content_hash=content_hash, stage=spec.stage)
        session.add(version)
        session.flush()
        session.add(StageChange(version_id=version.id, from_stage=None, to_stage=spec.stage, actor=actor))
        registry_events.stage_changed(session, version, None, spec.stage, actor)
        report.created.append(f"version {where} ({spec.stage})")
    elif version.stage != spec.stage:
        set_stage(session, version, spec.stage, actor=actor)
        report.updated.append(f"version {where} stage -> {spec.stage}")
    else:
        report.unchanged.append(f"version {where}")
    for variant_spec in spec.variants:
        _sync_variant(session, version, spec, variant_spec, report, where)


def _backend_config(version_spec: VersionSpec, spec: VariantSpec) -> dict[str, Any]:
    config = dict(spec.backend_config)
    # A local variant serves the version's own weights unless told otherwise.
    if spec.backend == "local" and "model" not in config and version_spec.weights:
        config["model"] = version_spec.weights
    # A vLLM-served variant's lab-side weights are the version's, unless it names its own.
    if (
        spec.backend == "openai_upstream"
        and config.get("engine") == "vllm"
        and "weights" not in config
        and version_spec.weights
    ):
        config["weights"] = version_spec.weights
    return config


def _sync_variant(
    session: Session,
    version: ModelVersion,
    version_spec: VersionSpec,
    spec: VariantSpec,
    report: SyncReport,
    where: str,
) -> None:
    backend_config = _backend_config(version_spec, spec)
    wanted = [(m.name, m.kind, m.config, m.stance) for m in spec.mitigations]
    variant = session.scalar(select(Variant).where(Variant.version_id == version.id, Variant.name == spec.name))
    label = f"variant {where}/{spec.name}"
    if variant is None:
        variant = Variant(
            version_id=version.id,
            name=spec.name,
            description=spec.description,
            backend=spec.backend,
            backend_config=backend_config,
            max_output_tokens=spec.max_output_tokens,
        )
        session.add(variant)
        session.flush()
        _replace_mitigations(session, variant, spec)
        registry_events.variant_registered(session, version, variant)
        report.created.append(label)
        return
    current = [(m.name, m.kind, m.config, m.stance) for m in variant.mitigations]
    changed = (
        variant.backend != spec.backend
        or variant.backend_config != backend_config
        or variant.description != spec.description
        or variant.max_output_tokens != spec.max_output_tokens
        or current != wanted
    )
    if not changed:
        report.unchanged.append(label)
        return
    variant.backend = spec.backend
    variant.backend_config = backend_config
    variant.description = spec.description
    variant.max_output_tokens = spec.max_output_tokens
    _replace_mitigations(session, variant, spec)
    registry_events.variant_registered(session, version, variant, updated=True)
    report.updated.append(label)


def _replace_mitigations(session: Session, variant: Variant, spec: VariantSpec) -> None:
    variant.mitigations.clear()
    session.flush()
    for position, m in enumerate(spec.mitigations):
        variant.mitigations.append(
            Mitigation(position=position, name=m.name, kind=m.kind, config=m.config, stance=m.stance)
        )
    session.flush()


def set_stage(session: Session, version: ModelVersion, stage: str, *, actor: str) -> None:
    """Move ``version`` to ``stage``, recording the transition."""
    session.add(StageChange(version_id=version.id, from_stage=version.stage, to_stage=stage, actor=actor))
    registry_events.stage_changed(session, version, version.stage, stage, actor)
    version.stage = stage
    version.stage_changed_at = utcnow()


# ---------------------------------------------------------------- lookups


def get_model(session: Session, name: str) -> Model:
    """Return the model called ``name`` or raise NotFoundError."""
    model = session.scalar(select(Model).where(Model.name == name))
    if model is None:
        raise NotFoundError(f"model {name!r} does not exist", code="model_not_found")
    return model


def latest_version(session: Session, model: Model) -> ModelVersion:
    """Return the most recently registered version of ``model``."""
    version = session.scalar(
        select(ModelVersion)
        .where(ModelVersion.model_id == model.id)
        .order_by(ModelVersion.created_at.desc(), ModelVersion.id.desc())
        .limit(1)
    )
    if version is None:
        raise NotFoundError(f"model {model.name!r} has no versions", code="model_not_found")
    return version


def get_version(session: Session, model: Model, label: str | None) -> ModelVersion:
    """Return the version of ``model`` with ``label`` (or a hex prefix of its hash); the latest when None."""
    if label is None:
        return latest_version(session, model)
    version = session.scalar(select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.label == label))
    if version is None and HASH_PREFIX_RE.fullmatch(label):
        # An exact comparison of a validated prefix, never LIKE: '_' and '%' would match any hash.
        found = session.scalars(
            select(ModelVersion)
            .where(
                ModelVersion.model_id == model.id,
                func.substr(ModelVersion.content_hash, 1, len(label)) == label,
            )
            .limit(2)
        ).all()
        if len(found) > 1:
            raise InvalidRequestError(
                f"hash prefix {label!r} names more than one version of {model.name!r}; give more characters or a label",
                code="ambiguous_version",
                param="model",
            )
        version = found[0] if found else None
    if version is None:
        raise NotFoundError(f"model {model.name!r} has no version {label!r}", code="model_not_found")
    return version


def get_variant(session: Session, version: ModelVersion, name: str) -> Variant:
    """Return the variant ``name`` of ``version`` with its mitigations loaded."""
    variant = session.scalar(
        select(Variant)
        .where(Variant.version_id == version.id, Variant.name == name)
        .options(selectinload(Variant.mitigations))
    )
    if variant is None:
        raise NotFoundError(
            f"model version {version.label!r} has no variant {name!r}", code="model_not_found", param="model"
        )
    return variant


def resolve(session: Session, ref: ModelRef) -> tuple[Model, ModelVersion, Variant]:
    """Resolve a parsed model id to its rows, raising NotFoundError for any unknown part."""
    model = get_model(session, ref.model)
    version = get_version(session, model, ref.version)
    variant = get_variant(session, version, ref.variant)
    return model, version, variant


@dataclass(frozen=True)
class ResolvedVariant:
    """A variant with its version and model, detached from the session: all serving needs."""

    model_id: str
    model_name: str
    version_id: str
    version_label: str
    variant_id: str
    variant_name: str
    backend: str
    backend_config: dict[str, Any] = field(hash=False)
    mitigations: list[dict[str, Any]] = field(hash=False)
    #: The manifest's cap on tokens per choice; None when it names none (see `output_token_limit`).
    max_output_tokens: int | None = None

    def output_token_limit(self) -> int:
        """Return the most tokens one choice may generate: the manifest's cap, else the backend's context."""
        if self.max_output_tokens is not None:
            return self.max_output_tokens
        # A generation can never be longer than the context it must fit in with its prompt.
        context = self.backend_config.get("max_context")
        if isinstance(context, int) and not isinstance(context, bool) and context > 0:
            return context
        return LOCAL_DEFAULT_CONTEXT if self.backend == "local" else DEFAULT_MAX_OUTPUT_TOKENS


def resolve_variant(session: Session, ref: ModelRef) -> ResolvedVariant:
    """Resolve ``ref`` into a detached ResolvedVariant (NotFoundError for unknown parts)."""
    model, version, variant = resolve(session, ref)
    return ResolvedVariant(
        model_id=model.id,
        model_name=model.name,
        version_id=version.id,
        version_label=version.label,
        variant_id=variant.id,
        variant_name=variant.name,
        backend=variant.backend,
        backend_config=dict(variant.backend_config),
        mitigations=[
            {"name": m.name, "kind": m.kind, "config": dict(m.config), "stance": m.stance} for m in variant.mitigations
        ],
        max_output_tokens=variant.max_output_tokens,
    )


class RegistryCache:
    """Caches model-id resolutions for a few seconds: the registry changes rarely, requests often.

    Only registry lookups are cached, never keys or grants, so revocation stays immediate; a
    newly synced version or changed mitigation is served at most ``ttl_s`` later.
    """

    def __init__(self, ttl_s: float = 2.0) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[ModelRef, tuple[float, ResolvedVariant]] = {}
        self._lock = threading.Lock()

    def peek(self, ref: ModelRef) -> ResolvedVariant | None:
        """Return a fresh cached resolution of ``ref`` without touching the database, or None."""
        with self._lock:
            hit = self._entries.get(ref)
        if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        return None

    def get(self, session_factory: Any, ref: ModelRef) -> ResolvedVariant:
        """Return the cached resolution of ``ref`` or resolve it with a new session."""
        now = time.monotonic()
        cached = self.peek(ref)
        if cached is not None:
            return cached
        with session_factory() as session:
            resolved = resolve_variant(session, ref)
        with self._lock:
            if len(self._entries) > 10_000:  # bound memory against callers cycling through ids
                self._entries.clear()
            self._entries[ref] = (now, resolved)
        return resolved

    def clear(self) -> None:
        """Forget every cached resolution (after a sync in this process)."""
        with self._lock:
            self._entries.clear()


def list_models(session: Session) -> list[Model]:
    """Return every model with versions, variants and mitigations loaded."""
    stmt = (
        select(Model)
        .order_by(Model.name)
        .options(selectinload(Model.versions).selectinload(ModelVersion.variants).selectinload(Variant.mitigations))
    )
    return list(session.scalars(stmt))
