"""Pydantic schemas of the lab manifest (``airlock.yaml``) and of registry objects leaving the API."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

Stage = Literal["training-checkpoint", "internal", "external-candidate", "deployed"]
Stance = Literal["disabled_for_eval", "claimed"]
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
#: No variant may let one choice generate more tokens than this, whatever its manifest says.
MAX_OUTPUT_TOKENS_CEILING = 1 << 20
#: The local backend's defaults (``LocalBackendConfig``; a test keeps them equal), known here
#: without importing torch.
LOCAL_DEFAULT_CONTEXT = 2048
LOCAL_DEFAULT_MAX_TOKENS = 256


def _check_name(value: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError(f"{value!r} is not a valid name: use letters, digits, '.', '_' or '-' (max 100)")
    return value


Name = Annotated[str, AfterValidator(_check_name)]


class StrictModel(BaseModel):
    """Manifest models reject unknown keys so typos are caught, not ignored."""

    model_config = ConfigDict(extra="forbid")


class MitigationSpec(StrictModel):
    """A mitigation of a variant, applied in list order."""

    name: Name = Field(description="Unique name within the variant.")
    kind: str = Field(description="`system_prompt`, `input_filter`, `output_filter`, `harmlessness_training`, ...")
    stance: Stance | None = Field(
        default=None, description="`disabled_for_eval`, `claimed`, or unset (which blocks the gate)."
    )
    config: dict[str, Any] = Field(default_factory=dict, description="Kind-specific settings.")


class VariantSpec(StrictModel):
    """A deployment protocol of a model version."""

    name: Name = Field(description="`production`, `helpful-only`, `base`, or any name.")
    description: str = ""
    backend: str = Field(default="local", description="Backend type: `local` or `openai_upstream`.")
    backend_config: dict[str, Any] = Field(default_factory=dict, description="Backend settings.")
    max_output_tokens: int | None = Field(
        default=None,
        ge=1,
        le=MAX_OUTPUT_TOKENS_CEILING,
        description="Most tokens one choice may generate (`max_tokens` above it is a 400); "
        "default: the backend's context (`backend_config.max_context`, 2048 for `local`), else 4096.",
    )
    mitigations: list[MitigationSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_mitigations(self) -> VariantSpec:
        names = [m.name for m in self.mitigations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant {self.name!r}: duplicate mitigation names {dupes}")
        return self

    @model_validator(mode="after")
    def _no_noise(self) -> VariantSpec:
        # A registered variant serves the weights its version's hash names; noised copies exist
        # only as the short-lived variants of a noise-injection job.
        noise = sorted(k for k in self.backend_config if k.startswith("noise_"))
        if noise:
            raise ValueError(
                f"variant {self.name!r}: backend_config {noise} is set only by noise-injection jobs, not a manifest"
            )
        return self

    @model_validator(mode="after")
    def _default_within_cap(self) -> VariantSpec:
        # A request that names no limit gets the backend's default, which must respect the cap too.
        if self.backend == "local" and self.max_output_tokens is not None:
            default = self.backend_config.get("default_max_tokens", LOCAL_DEFAULT_MAX_TOKENS)
            if isinstance(default, int) and default > self.max_output_tokens:
                raise ValueError(
                    f"variant {self.name!r}: backend_config.default_max_tokens ({default}) exceeds "
                    f"max_output_tokens ({self.max_output_tokens}); lower it"
                )
        return self


class VersionSpec(StrictModel):
    """One version (set of weights) of a model."""

    label: Name | None = Field(default=None, description="Human label; default: first 12 hex of the hash.")
    stage: Stage = "external-candidate"
    weights: str | None = Field(
        default=None, description="Weights the version is hashed from: `embedded:smollm2-135m`, a path, ..."
    )
    content_hash: str | None = Field(default=None, description="SHA-256 of the weights when not hashable here.")
    variants: list[VariantSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> VersionSpec:
        if not self.weights and not self.content_hash:
            raise ValueError("a version needs `weights` (to hash) or an explicit `content_hash`")
        if self.content_hash and not re.fullmatch(r"[0-9a-f]{64}", self.content_hash):
            raise ValueError("content_hash must be 64 lowercase hex characters (SHA-256)")
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate variant names {dupes}")
        return self


class ModelSpec(StrictModel):
    """A model family and its versions."""

    name: Name
    description: str = ""
    versions: list[VersionSpec] = Field(min_length=1)


class Manifest(StrictModel):
    """The lab manifest: every model, version, variant and mitigation Airlock serves."""

    models: list[ModelSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_models(self) -> Manifest:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate model names {dupes}")
        return self


# ---------------------------------------------------------------- public views


class MitigationPublic(BaseModel):
    """A mitigation as shown by the API."""

    name: str
    kind: str
    stance: str | None
    position: int


class VariantPublic(BaseModel):
    """A variant as shown by the admin API (backend config is not exposed)."""

    id: str
    name: str
    backend: str
    mitigations: list[MitigationPublic]


class VersionPublic(BaseModel):
    """A version as shown by the admin API."""

    id: str
    label: str
    content_hash: str
    stage: str
    created_at: datetime
    variants: list[VariantPublic]


class ModelPublic(BaseModel):
    """A model as shown by the admin API."""

    id: str
    name: str
    description: str
    versions: list[VersionPublic]

    @classmethod
    def of(cls, model: Any) -> ModelPublic:
        """Build the view of a ``Model`` row with its versions, variants and mitigation stances."""
        return cls(
            id=model.id,
            name=model.name,
            description=model.description,
            versions=[
                VersionPublic(
                    id=v.id,
                    label=v.label,
                    content_hash=v.content_hash,
                    stage=v.stage,
                    created_at=v.created_at,
                    variants=[
                        VariantPublic(
                            id=var.id,
                            name=var.name,
                            backend=var.backend,
                            mitigations=[
                                MitigationPublic(name=x.name, kind=x.kind, stance=x.stance, position=x.position)
                                for x in var.mitigations
                            ],
                        )
                        for var in v.variants
                    ],
                )
                for v in model.versions
            ],
        )


class SyncReport(BaseModel):
    """What a manifest sync changed."""

    created: list[str] = Field(default_factory=list)
    updated: list[str] = Field(default_factory=list)
    unchanged: list[str] = Field(default_factory=list)
