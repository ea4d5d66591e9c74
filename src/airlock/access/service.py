"""Access logic: evaluators, grants, keys, admin tokens, authentication and authorization."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import event, inspect, select
from sqlalchemy.orm import Session, joinedload, selectinload

from airlock.access import events as access_events
from airlock.access import seal
from airlock.access.models import SCOPES, AdminToken, ApiKey, Evaluator, Grant
from airlock.access.roles import Permission, check_permission, parse_role
from airlock.access.terms import validate_terms
from airlock.db import utcnow
from airlock.errors import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)
from airlock.ids import parse_version_ref
from airlock.registry.models import Model, ModelVersion
from airlock.registry.service import ResolvedVariant, get_model, get_version
from airlock.signals import emit

KEY_PREFIX = "ak_"
ADMIN_PREFIX = "at_"
_DURATION_RE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}

ACCESS_CHANNEL = "airlock_access"
"""Signalled when a key or grant changes in a way that may end or narrow access (``airlock.signals``)."""


def access_changed(session: Session) -> None:
    """Make every process drop its cached authentications when ``session`` commits (revocations, edits)."""
    emit(session, ACCESS_CHANNEL)


# Usage counters move on every request through a core UPDATE; a change to them alters no access.
_USAGE_COLUMNS = frozenset({"tokens_used"})


@event.listens_for(Session, "before_flush")
def _signal_access_edits(session: Session, _context: object, _instances: object) -> None:
    """Signal :data:`ACCESS_CHANNEL` for any edit to a grant, key or evaluator, however it was made.

    Revocation signals explicitly; this catches the rest (a grant narrowed by the lab, a key moved,
    an evaluator renamed), so a cached authentication never outlives the row it was read from.
    """
    for row in (*session.dirty, *session.deleted):
        if isinstance(row, Grant | ApiKey | Evaluator) and (row in session.deleted or _edited(row)):
            access_changed(session)
            return


def _edited(row: object) -> bool:
    state = inspect(row)
    return any(
        attr.key not in _USAGE_COLUMNS and attr.history.has_changes()
        for attr in state.attrs  # type: ignore[union-attr]
    )


def hash_secret(token: str) -> str:
    """Return the SHA-256 hex digest under which a key or token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def parse_duration(text: str) -> timedelta:
    """Parse ``30d``, ``12h``, ``90m``, ``2w`` or ``45s`` into a timedelta."""
    match = _DURATION_RE.match(text.strip())
    if not match:
        raise InvalidRequestError(f"duration {text!r} is not like 30d, 12h, 90m, 2w")
    amount, unit = int(match.group(1)), match.group(2)
    if amount <= 0:
        raise InvalidRequestError("duration must be positive")
    return timedelta(**{_UNITS[unit]: amount})


# ---------------------------------------------------------------- evaluators


def create_evaluator(session: Session, name: str, contact: str = "") -> Evaluator:
    """Register an evaluator organisation; names are unique."""
    name = name.strip()
    if not name or len(name) > 100:
        raise InvalidRequestError("evaluator name must be 1-100 characters")
    if session.scalar(select(Evaluator).where(Evaluator.name == name)) is not None:
        raise ConflictError(f"evaluator {name!r} already exists")
    evaluator = Evaluator(name=name, contact=contact)
    session.add(evaluator)
    session.flush()
    return evaluator


def get_evaluator(session: Session, name_or_id: str) -> Evaluator:
    """Return an evaluator by name or id."""
    evaluator = session.scalar(select(Evaluator).where((Evaluator.name == name_or_id) | (Evaluator.id == name_or_id)))
    if evaluator is None:
        raise NotFoundError(f"evaluator {name_or_id!r} does not exist")
    return evaluator


def list_evaluators(session: Session) -> list[Evaluator]:
    """Return every evaluator, by name."""
    return list(session.scalars(select(Evaluator).order_by(Evaluator.name)))


# ---------------------------------------------------------------- grants


@dataclass(frozen=True)
class GrantRequest:
    """Everything needed to issue a grant; ``terms`` holds each capability's terms (``airlock.access.terms``)."""

    evaluator: str
    model: str
    variants: list[str]
    scopes: list[str]
    versions: list[str] | None = None
    not_before: datetime | None = None
    not_after: datetime | None = None
    terms: Mapping[str, Any] = field(default_factory=dict)
    notes: str = ""
    created_by: str = "admin"
    issued_by_token_id: str | None = None


def _clean_list(values: Iterable[str], what: str) -> list[str]:
    cleaned = sorted({v.strip() for v in values if v.strip()})
    if not cleaned:
        raise InvalidRequestError(f"a grant needs at least one {what}")
    return cleaned


def create_grant(session: Session, req: GrantRequest) -> Grant:
    """Issue a grant after checking that every named version and variant exists."""
    evaluator = get_evaluator(session, req.evaluator)
    ref = parse_version_ref(req.model)
    model, version_label = get_model(session, ref.model), ref.version
    scopes = _clean_list(req.scopes, "scope")
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise InvalidRequestError(f"unknown scope(s) {unknown}; valid scopes: {', '.join(SCOPES)}")
    variants = _clean_list(req.variants, "variant")
    labels = list(req.versions or []) + ([version_label] if version_label else [])
    versions = [get_version(session, model, label) for label in labels] or [get_version(session, model, None)]
    for version in versions:
        have = {v.name for v in version.variants}
        missing = [v for v in variants if v not in have]
        if missing:
            raise NotFoundError(f"{model.name}@{version.label} has no variant(s) {missing}; it has {sorted(have)}")
    not_before = req.not_before or utcnow()
    if req.not_after is not None and req.not_after <= not_before:
        raise InvalidRequestError("the grant would end before it starts (not_after <= not_before)")
    terms = validate_terms(req.terms)
    grant = Grant(
        evaluator_id=evaluator.id,
        model_id=model.id,
        version_ids=sorted({v.id for v in versions}),
        variants=variants,
        scopes=scopes,
        not_before=not_before,
        not_after=req.not_after,
        terms=terms,
        notes=req.notes,
        created_by=req.created_by,
        issued_by_token_id=req.issued_by_token_id,
    )
    session.add(grant)
    session.flush()
    seal.seal_grant(session, grant)
    access_events.grant_issued(session, grant)
    return grant


def get_grant(session: Session, grant_id: str) -> Grant:
    """Return a grant by id."""
    grant = session.scalar(select(Grant).where(Grant.id == grant_id).options(selectinload(Grant.evaluator)))
    if grant is None:
        raise NotFoundError(f"grant {grant_id!r} does not exist")
    return grant


def list_grants(session: Session, *, evaluator: str | None = None, include_revoked: bool = True) -> list[Grant]:
    """Return grants, newest first, optionally for one evaluator."""
    stmt = select(Grant).options(selectinload(Grant.evaluator)).order_by(Grant.created_at.desc())
    if evaluator:
        stmt = stmt.where(Grant.evaluator_id == get_evaluator(session, evaluator).id)
    if not include_revoked:
        stmt = stmt.where(Grant.revoked_at.is_(None))
    return list(session.scalars(stmt))


def revoke_grant(session: Session, grant_id: str, reason: str = "") -> Grant:
    """Revoke a grant at once; every key bound to it stops working on its next request."""
    grant = get_grant(session, grant_id)
    if grant.revoked_at is not None:
        raise ConflictError(f"grant {grant_id} was already revoked at {grant.revoked_at.isoformat()}")
    # Revocation always goes through, even without the seal key; only a grant that held its seal is
    # re-sealed, so a row edited outside Airlock keeps failing its check (and stays reported).
    try:
        sealer: seal.GrantSealer | None = seal.sealer_for(session)
    except seal.GrantSealKeyError:
        sealer = None
    intact = sealer is not None and sealer.failure(grant) is None
    grant.revoked_at = utcnow()
    grant.revoked_reason = reason or None
    if sealer is not None and intact:
        grant.seal = sealer.seal(grant)
    session.flush()
    access_events.grant_revoked(session, grant)
    access_changed(session)
    return grant


def grant_status(grant: Grant, now: datetime | None = None) -> str:
    """Return ``active``, ``revoked``, ``expired`` or ``pending`` for a grant."""
    now = now or utcnow()
    if grant.revoked_at is not None:
        return "revoked"
    if grant.not_after is not None and now >= grant.not_after:
        return "expired"
    if now < grant.not_before:
        return "pending"
    return "active"


# ---------------------------------------------------------------- keys


def create_api_key(session: Session, grant_id: str, name: str = "") -> tuple[ApiKey, str]:
    """Create an API key for a grant; returns the row and the plaintext key (shown once)."""
    grant = get_grant(session, grant_id)
    if grant_status(grant) in ("revoked", "expired"):
        raise ConflictError(f"grant {grant_id} is {grant_status(grant)}; no new keys can be issued")
    token = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(grant_id=grant.id, key_hash=hash_secret(token), display_prefix=token[:10], name=name)
    session.add(key)
    session.flush()
    return key, token


def revoke_api_key(session: Session, key_id: str) -> ApiKey:
    """Revoke a single API key."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFoundError(f"key {key_id!r} does not exist")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        access_changed(session)
    session.flush()
    return key


def create_admin_token(session: Session, name: str, role: str = "admin") -> tuple[AdminToken, str]:
    """Create a lab token of a known role (400 ``unknown_role`` otherwise); returns it, shown once."""
    name = name.strip()
    if not name or len(name) > 100:
        raise InvalidRequestError("a lab token's name must be 1-100 characters", param="name")
    checked = parse_role(role)
    token = ADMIN_PREFIX + secrets.token_urlsafe(32)
    row = AdminToken(name=name, role=checked.value, token_hash=hash_secret(token), display_prefix=token[:10])
    session.add(row)
    session.flush()
    return row, token


@dataclass(frozen=True)
class Principal:
    """An authenticated evaluator key with its grant and organisation (detached snapshots)."""

    key_id: str
    grant_id: str
    evaluator_id: str
    evaluator_name: str
    grant: Grant


@dataclass(frozen=True)
class AdminPrincipal:
    """An authenticated lab admin token and its role (see ``airlock.access.roles``)."""

    token_id: str
    name: str
    role: str

    def require(self, permission: Permission) -> None:
        """Refuse (403 ``role_not_allowed``) unless this token's role holds ``permission``."""
        check_permission(self.role, permission)


def _bearer_hash(token: str | None) -> str:
    if not token:
        raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
    return hash_secret(token)


def authenticate_key(session: Session, token: str | None) -> Principal:
    """Return the principal for an evaluator key.

    401 for unknown or revoked keys and revoked grants; 403 ``grant_integrity_error`` (an audit
    alert) when the key's grant no longer matches its seal.
    """
    digest = _bearer_hash(token)
    key = session.scalar(
        select(ApiKey).where(ApiKey.key_hash == digest).options(joinedload(ApiKey.grant).joinedload(Grant.evaluator))
    )
    # compare_digest on the stored hash keeps the check constant-time after the indexed lookup.
    if key is None or not hmac.compare_digest(key.key_hash, digest):
        raise AuthenticationError("invalid API key")
    # Before anything the row says: a grant edited outside Airlock is refused (403) as an audit alert.
    seal.check_grant(session, key.grant)
    if key.revoked_at is not None:
        raise AuthenticationError("this API key has been revoked", code="key_revoked")
    if key.grant.revoked_at is not None:
        raise AuthenticationError("the grant of this API key has been revoked", code="grant_revoked")
    return Principal(
        key_id=key.id,
        grant_id=key.grant_id,
        evaluator_id=key.grant.evaluator_id,
        evaluator_name=key.grant.evaluator.name,
        grant=key.grant,
    )


def authenticate_key_id(session: Session, key_id: str) -> Principal:
    """Re-check a signed-in key by id: the same refusals as :func:`authenticate_key`, at once after revocation."""
    key = session.scalar(
        select(ApiKey).where(ApiKey.id == key_id).options(joinedload(ApiKey.grant).joinedload(Grant.evaluator))
    )
    if key is None:
        raise AuthenticationError("invalid API key")
    seal.check_grant(session, key.grant)
    if key.revoked_at is not None:
        raise AuthenticationError("this API key has been revoked", code="key_revoked")
    if key.grant.revoked_at is not None:
        raise AuthenticationError("the grant of this API key has been revoked", code="grant_revoked")
    return Principal(
        key_id=key.id,
        grant_id=key.grant_id,
        evaluator_id=key.grant.evaluator_id,
        evaluator_name=key.grant.evaluator.name,
        grant=key.grant,
    )


def authenticate_admin_id(session: Session, token_id: str) -> AdminPrincipal:
    """Re-check a lab token already signed in (by id); 401 once it is revoked."""
    row = session.get(AdminToken, token_id)
    if row is None or row.revoked_at is not None:
        raise AuthenticationError("this lab token has been revoked", code="token_revoked")
    return AdminPrincipal(token_id=row.id, name=row.name, role=row.role)


def identify_key(session: Session, token: str | None) -> Principal | None:
    """Return who a key belongs to even when it is revoked (for the audit trail), or None."""
    if not token:
        return None
    key = session.scalar(
        select(ApiKey)
        .where(ApiKey.key_hash == hash_secret(token))
        .options(joinedload(ApiKey.grant).joinedload(Grant.evaluator))
    )
    if key is None:
        return None
    return Principal(
        key_id=key.id,
        grant_id=key.grant_id,
        evaluator_id=key.grant.evaluator_id,
        evaluator_name=key.grant.evaluator.name,
        grant=key.grant,
    )


def authenticate_admin(session: Session, token: str | None) -> AdminPrincipal:
    """Return the principal for a lab admin token; 401 otherwise."""
    digest = _bearer_hash(token)
    row = session.scalar(select(AdminToken).where(AdminToken.token_hash == digest))
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.token_hash, digest):
        raise AuthenticationError("invalid admin token")
    return AdminPrincipal(token_id=row.id, name=row.name, role=row.role)


def check_window(grant: Grant, now: datetime | None = None) -> None:
    """Raise 403 when the grant is outside its validity window."""
    status = grant_status(grant, now)
    if status == "expired":
        assert grant.not_after is not None
        raise PermissionDeniedError(f"grant {grant.id} expired at {grant.not_after.isoformat()}", code="grant_expired")
    if status == "pending":
        raise PermissionDeniedError(
            f"grant {grant.id} is not valid before {grant.not_before.isoformat()}", code="grant_not_yet_valid"
        )


def authorize(principal: Principal, target: ResolvedVariant, scopes: Iterable[str]) -> None:
    """Check the principal's grant covers ``target`` with every scope in ``scopes`` (403 otherwise).

    The target has already been resolved, so an unknown model, version or variant was a 404
    before this check; here everything that exists but is not granted is a 403.
    """
    grant = principal.grant
    check_window(grant)
    if target.model_id != grant.model_id:
        raise PermissionDeniedError(f"your grant does not cover model {target.model_name!r}", code="model_not_granted")
    if target.version_id not in grant.version_ids:
        raise PermissionDeniedError(
            f"your grant does not cover version {target.version_label!r} of {target.model_name!r}",
            code="version_not_granted",
        )
    if target.variant_name not in grant.variants:
        raise PermissionDeniedError(
            f"your grant does not cover variant {target.variant_name!r} of {target.model_name!r}",
            code="variant_not_granted",
        )
    missing = [s for s in scopes if s not in grant.scopes]
    if missing:
        raise PermissionDeniedError(f"your grant lacks the scope(s) {missing}", code="scope_not_granted")


def granted_model_ids(session: Session, principal: Principal) -> list[str]:
    """Return every ``{model}@{version}/{variant}`` and ``{model}/{variant}`` id the principal may sample."""
    grant = principal.grant
    if grant_status(grant) != "active" or "sample" not in grant.scopes:
        return []
    model = session.get(Model, grant.model_id)
    if model is None:
        return []
    versions = list(
        session.scalars(
            select(ModelVersion)
            .where(ModelVersion.id.in_(grant.version_ids))
            .options(selectinload(ModelVersion.variants))
        )
    )
    latest = get_version(session, model, None)
    ids: list[str] = []
    for version in sorted(versions, key=lambda v: v.created_at):
        for variant in version.variants:
            if variant.name in grant.variants:
                if version.id == latest.id:
                    ids.append(f"{model.name}/{variant.name}")
                ids.append(f"{model.name}@{version.label}/{variant.name}")
    return ids
