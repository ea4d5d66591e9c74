"""Wire schemas of the admin access API: ``XCreate`` in, ``XPublic`` out."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy.orm import Session, object_session

from airlock.access.acceptance import GrantAcceptance, current_acceptance, terms_sha256
from airlock.access.models import ApiKey, AuditEvent, Evaluator, Grant
from airlock.access.sealing import SealedItem
from airlock.access.service import grant_status
from airlock.access.terms import all_terms, term_defaults, terms_of


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _terms_schema(schema: dict[str, Any]) -> None:
    """Document every declared grant term (as registered when the document is generated)."""
    properties: dict[str, Any] = {}
    for cls in all_terms().values():
        for name, prop in cls.model_json_schema()["properties"].items():
            properties[name] = {**prop, "description": f"({cls.section}) " + prop.get("description", "")}
    schema["properties"] = properties
    schema["additionalProperties"] = True  # sections by name are accepted too; the server names unknown terms


class EvaluatorCreate(_In):
    """Register an evaluator organisation."""

    name: str = Field(min_length=1, max_length=100, description="Unique organisation name.")
    contact: str = Field(default="", max_length=200, description="Contact address.")


class EvaluatorPublic(BaseModel):
    """An evaluator organisation."""

    id: str
    name: str
    contact: str
    created_at: datetime

    @classmethod
    def of(cls, row: Evaluator) -> EvaluatorPublic:
        """Build from a row."""
        return cls(id=row.id, name=row.name, contact=row.contact, created_at=row.created_at)


class GrantCreate(_In):
    """Issue a grant."""

    @model_validator(mode="before")
    @classmethod
    def _top_level_terms(cls, data: Any) -> Any:
        """Accept a term given at the top level (the form before terms had their own field) as a term."""
        if not isinstance(data, dict):
            return data
        declared = term_defaults()
        moved = {k: v for k, v in data.items() if k in declared and k not in cls.model_fields}
        if not moved:
            return data
        terms = data.get("terms")
        if terms is not None and not isinstance(terms, dict):
            return data  # the field's own validation names the problem
        rest = {k: v for k, v in data.items() if k not in moved}
        return {**rest, "terms": {**moved, **(terms or {})}}

    evaluator: str = Field(description="Evaluator name or id.")
    model: str = Field(description="Model name, optionally `name@version`.")
    versions: list[str] | None = Field(default=None, description="Version labels; default the latest.")
    variants: list[str] = Field(min_length=1, description="Variant names the grant covers.")
    scopes: list[str] = Field(min_length=1, description="`sample`, `logprobs`, `finetune`, `interp`, `redteam`.")
    not_before: datetime | None = Field(default=None, description="Start of validity (UTC); default now.")
    not_after: datetime | None = Field(default=None, description="End of validity (UTC).")
    expires_in: str | None = Field(default=None, description="Alternative to not_after, e.g. `30d`.")
    terms: dict[str, Any] = Field(
        default_factory=dict,
        description='Each capability\'s terms by name, flat or by section (e.g. `{"quota_total_tokens": 100000}`); '
        "unset terms take their defaults. Term names are also accepted at the top level.",
        json_schema_extra=_terms_schema,
    )
    notes: str = ""


class GrantRevoke(_In):
    """Revoke a grant."""

    reason: str = Field(default="", max_length=2000)


class AcceptanceState(BaseModel):
    """Whether the evaluator has accepted the grant's current terms, and with which key."""

    terms_sha256: str = Field(description="SHA-256 of the grant's current proposal (canonical JSON).")
    accepted: bool = Field(description="Whether a signed acceptance of exactly these terms is recorded.")
    accepted_at: datetime | None = None
    key_fingerprint: str | None = Field(default=None, description="The evaluator's signing key that accepted.")
    seal_public_key: str | None = Field(default=None, description="X25519 key sealed content is encrypted to.")

    @classmethod
    def of(cls, digest: str, row: GrantAcceptance | None) -> AcceptanceState:
        """Build from the current proposal's hash and the current acceptance (None: not accepted)."""
        if row is None:
            return cls(terms_sha256=digest, accepted=False)
        return cls(
            terms_sha256=digest,
            accepted=True,
            accepted_at=row.accepted_at,
            key_fingerprint=row.signing_key_fingerprint,
            seal_public_key=row.seal_public_key,
        )

    @classmethod
    def of_grant(cls, session: Session | None, grant: Grant) -> AcceptanceState:
        """Read the state of ``grant`` (without a session: not accepted as far as can be told)."""
        row = current_acceptance(session, grant) if session is not None else None
        return cls.of(terms_sha256(grant), row)


class GrantPublic(BaseModel):
    """A grant as the lab sees it."""

    id: str
    evaluator: str
    model_id: str
    version_ids: list[str]
    variants: list[str]
    scopes: list[str]
    not_before: datetime
    not_after: datetime | None
    status: str
    terms: dict[str, dict[str, Any]] = Field(
        description="Every capability's terms by section, defaults included (also repeated flat, by term name)."
    )
    tokens_used: int
    created_at: datetime
    revoked_at: datetime | None
    revoked_reason: str | None
    acceptance: AcceptanceState = Field(description="The evaluator's signed acceptance of the current terms.")

    model_config = ConfigDict(extra="allow")

    @classmethod
    def of(cls, row: Grant) -> GrantPublic:
        """Build from a row (evaluator loaded)."""
        sections = {name: terms_of(row, section).model_dump(mode="json") for name, section in all_terms().items()}
        return cls(
            id=row.id,
            evaluator=row.evaluator.name,
            model_id=row.model_id,
            version_ids=list(row.version_ids),
            variants=list(row.variants),
            scopes=list(row.scopes),
            not_before=row.not_before,
            not_after=row.not_after,
            status=grant_status(row),
            terms=sections,
            **{name: value for values in sections.values() for name, value in values.items()},
            tokens_used=row.tokens_used,
            created_at=row.created_at,
            revoked_at=row.revoked_at,
            revoked_reason=row.revoked_reason,
            acceptance=AcceptanceState.of_grant(object_session(row), row),
        )


class KeyCreate(_In):
    """Create an API key for a grant."""

    name: str = Field(default="", max_length=100)


class KeyCreated(BaseModel):
    """A new API key; ``key`` is shown only in this response."""

    id: str
    grant_id: str
    key: str
    display_prefix: str


class KeyPublic(BaseModel):
    """An API key without its secret."""

    id: str
    grant_id: str
    name: str
    display_prefix: str
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, row: ApiKey) -> KeyPublic:
        """Build from a row."""
        return cls(
            id=row.id,
            grant_id=row.grant_id,
            name=row.name,
            display_prefix=row.display_prefix,
            created_at=row.created_at,
            revoked_at=row.revoked_at,
        )


class AuditEventPublic(BaseModel):
    """An audit event."""

    id: int
    ts: datetime
    request_id: str
    actor_type: str
    actor: str | None
    grant_id: str | None
    method: str
    path: str
    model: str | None
    variant: str | None
    scope: str | None
    status_code: int
    outcome: str
    error_code: str | None
    tokens_in: int
    tokens_out: int
    latency_ms: float
    detail: dict[str, Any]

    @classmethod
    def of(cls, row: AuditEvent) -> AuditEventPublic:
        """Build from a row."""
        return cls.model_validate(row, from_attributes=True)


class GrantTermsProposal(BaseModel):
    """The terms the lab proposes for the caller's grant, their hash, and whether they are accepted."""

    grant_id: str
    model: str = Field(description="The model's name (the proposal names it by id).")
    versions: list[str] = Field(description="The granted versions' labels, in the proposal's order.")
    proposal: dict[str, Any] = Field(description="The canonical terms document (airlock.grant-terms/v1).")
    terms_sha256: str = Field(description="SHA-256 (hex) of the proposal's RFC 8785 bytes: what an acceptance signs.")
    acceptance: AcceptanceState


class GrantAccept(_In):
    """The evaluator's signed acceptance of its grant's current terms."""

    terms_sha256: str = Field(pattern="^[0-9a-f]{64}$", description="SHA-256 of the proposal being accepted.")
    seal_public_key: str = Field(
        min_length=40, max_length=64, description="Base64 raw 32-byte X25519 key sealed content is encrypted to."
    )
    accepted_at: str = Field(
        min_length=20,
        max_length=40,
        description="When the evaluator signed: UTC ISO-8601 with microseconds and Z, exactly as signed.",
    )
    signature: str = Field(
        min_length=40, max_length=100, description="Base64 Ed25519 signature over the canonical acceptance document."
    )
    key_fingerprint: str = Field(
        pattern="^[0-9a-f]{64}$", description="SHA-256 fingerprint of the registered signing key that signed."
    )


class GrantAcceptancePublic(BaseModel):
    """A recorded acceptance."""

    id: str
    grant_id: str
    terms_sha256: str
    key_fingerprint: str
    seal_public_key: str
    signature: str
    accepted_at: datetime

    @classmethod
    def of(cls, row: GrantAcceptance) -> GrantAcceptancePublic:
        """Build from a row."""
        return cls(
            id=row.id,
            grant_id=row.grant_id,
            terms_sha256=row.terms_sha256,
            key_fingerprint=row.signing_key_fingerprint,
            seal_public_key=row.seal_public_key,
            signature=row.signature,
            accepted_at=row.accepted_at,
        )


class SealedItemPublic(BaseModel):
    """A sealed item's metadata: what it is, its plaintext's SHA-256 and size, the key it is sealed to, its release."""

    id: str
    grant_id: str
    evaluator_id: str
    capability: str
    kind: str
    ref: str
    name: str
    plaintext_sha256: str
    size: int
    recipient_sha256: str = Field(description="SHA-256 of the X25519 public key the content is sealed to.")
    ciphertext_sha256: str
    created_at: datetime
    released_at: datetime | None
    released_by: str | None

    @classmethod
    def of(cls, row: SealedItem) -> SealedItemPublic:
        """Build from a row."""
        return cls(
            id=row.id,
            grant_id=row.grant_id,
            evaluator_id=row.evaluator_id,
            capability=row.capability,
            kind=row.kind,
            ref=row.ref,
            name=row.name,
            plaintext_sha256=row.plaintext_sha256,
            size=row.size,
            recipient_sha256=row.recipient_sha256,
            ciphertext_sha256=row.ciphertext_sha256,
            created_at=row.created_at,
            released_at=row.released_at,
            released_by=row.released_by,
        )


class SealedRelease(_In):
    """The decrypted content of a sealed item, sent back to release it to the lab."""

    content_base64: str = Field(description="The item's plaintext, base64; its SHA-256 must match the sealed digest.")
