"""Grant seals: an HMAC-SHA256 over each grant's canonical terms, under a key the database does not hold.

The gateway enforces the ``grants`` row and the ledger proves what was logged; the seal binds the
row to the process that wrote it. Every change the service makes to a grant re-seals it, and every
use of a grant (authenticating one of its keys, reading its quotas, running its jobs) checks the
seal first. A row edited behind the service's back (a scope added, a quota widened, a window
stretched, a revocation undone) is refused with 403 ``grant_integrity_error``, recorded as an
``alert`` in the audit trail and logged at error level. ``airlock ledger check`` also compares each
grant with its ``grant.issued`` / ``grant.revoked`` entries (:func:`check_grants`).

What is sealed (``airlock.access.terms``): every column of ``grants`` but the seal itself and the
token usage counter the audit writer adds to, so a column added later is covered without a change
here. A column holding NULL or its declared scalar default is left out of the canonical form:
adding a column whose default is the behaviour grants had before it leaves their seals valid.

The key: ``AIRLOCK_GRANT_SEAL_KEY`` (hex) or the file ``<home>/grant-seal.key``, created with mode
0600 while no grant in the database is sealed and never over sealed grants, so a lost or replaced
key fails closed with a message that says so.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, select
from sqlalchemy.orm import Session

from airlock.access import events
from airlock.access.models import AuditEvent, Evaluator, Grant
from airlock.access.terms import grant_terms, term_defaults
from airlock.canonical import CanonicalJSONError, canonical_bytes, canonical_text
from airlock.config import Settings, get_settings
from airlock.db import Database, new_id
from airlock.errors import ConfigError, PermissionDeniedError
from airlock.ledger import commitment_of
from airlock.ledger.service import LoggedEvent, logged_events

__all__ = [
    "ALERT_OUTCOME",
    "GrantIntegrityError",
    "GrantSealKeyError",
    "GrantSealer",
    "ResealReport",
    "SealKey",
    "check_grant",
    "check_grants",
    "grant_holds",
    "load_key",
    "parse_key",
    "prepare_grant_seals",
    "record_alert",
    "reseal_grants",
    "seal_grant",
    "sealer_for",
    "verified_grant",
]

log = logging.getLogger(__name__)

SEAL_VERSION = "gs1"
KEY_BYTES = 32
KEY_ENV = "AIRLOCK_GRANT_SEAL_KEY"
ALERT_OUTCOME = "alert"
"""The audit outcome of a refused use of a grant that failed its seal (``outcome = 'alert'``)."""

_MAC_DOMAIN = b"airlock grant seal v1\n"
_KEY_ID_DOMAIN = b"airlock grant seal key id v1"
_REASONS = {
    "unsealed": "it has no seal",
    "malformed": "its seal is malformed",
    "other_key": "it was sealed under another key",
    "mismatch": "its terms differ from what was sealed",
    "unencodable": "its terms hold a value canonical JSON cannot represent",
}
_DOCS = "see docs/ledger.md, 'Grant seals'"


class GrantSealKeyError(ConfigError):
    """The grant seal key is missing, malformed, or not the key that sealed the database's grants."""

    default_code = "grant_seal_key_error"


class GrantSealUnavailableError(ConfigError):
    """A request met a grant seal key problem: refused without naming the operator's files."""

    default_code = "grant_seal_key_unavailable"


class GrantIntegrityError(PermissionDeniedError):
    """A grant's row no longer matches its seal: the use is refused and audited as an ``alert``."""

    default_code = "grant_integrity_error"
    audit_outcome = ALERT_OUTCOME

    def __init__(self, grant_id: str, reason: str) -> None:
        super().__init__(f"grant {grant_id} failed its integrity check and cannot be used; the lab has been alerted")
        self.grant_id = grant_id
        self.reason = reason

    @property
    def audit_detail(self) -> dict[str, Any]:
        """The alert's facts for the audit row (the caller sees only the message)."""
        return {"alert": "grant_integrity", "grant_id": self.grant_id, "reason": self.reason}


# ---------------------------------------------------------------- the key


@dataclass(frozen=True)
class SealKey:
    """A grant seal key and where it came from (the secret never appears in a repr)."""

    secret: bytes = field(repr=False)
    source: str

    @property
    def key_id(self) -> str:
        """Return the key's public id (16 hex), written into every seal it makes."""
        return hmac.new(self.secret, _KEY_ID_DOMAIN, hashlib.sha256).hexdigest()[:16]

    def derive(self, purpose: str, grant_id: str) -> bytes:
        """Return a 32-byte key for ``purpose`` and one grant: HMAC-SHA256 under the lab secret, never stored.

        The purpose separates the domains (a derived key reveals neither the secret nor the seals).
        """
        message = b"airlock derived key v1\0" + purpose.encode() + b"\0" + grant_id.encode()
        return hmac.new(self.secret, message, hashlib.sha256).digest()


def parse_key(text: str, source: str) -> SealKey:
    """Parse a hex key of at least 32 bytes (GrantSealKeyError naming ``source`` otherwise)."""
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError:
        raise GrantSealKeyError(f"the grant seal key in {source} is not hex ({_DOCS})") from None
    if len(secret) < KEY_BYTES:
        raise GrantSealKeyError(
            f"the grant seal key in {source} has {len(secret)} bytes; at least {KEY_BYTES} are needed ({_DOCS})"
        )
    return SealKey(secret, source)


def _create_key_file(path: Path) -> None:
    """Write a new random key to ``path`` (mode 0600) unless another process wrote one first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(os.urandom(KEY_BYTES).hex() + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    try:
        # link() fails if another process won the race: its key, complete on disk, is then the key.
        os.link(tmp, path)
        log.warning("created the grant seal key %s (back it up apart from the database)", path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def load_key(settings: Settings, *, create: bool = False) -> SealKey:
    """Return the configured key: ``AIRLOCK_GRANT_SEAL_KEY``, else the key file (created only if ``create``)."""
    if settings.grant_seal_key is not None:
        return parse_key(settings.grant_seal_key.get_secret_value(), KEY_ENV)
    path = settings.grant_seal_key_path
    if not path.exists():
        if not create:
            raise GrantSealKeyError(f"no grant seal key: {path} does not exist and {KEY_ENV} is not set ({_DOCS})")
        _create_key_file(path)
    if path.stat().st_mode & 0o077:
        log.warning("the grant seal key %s is readable by other users; chmod 600 it", path)
    return parse_key(path.read_text(), str(path))


def _seal_key_ids(session: Session) -> Counter[str]:
    """Count the sealed grants of the database by the id of the key that sealed them."""
    ids: Counter[str] = Counter()
    for seal in session.scalars(select(Grant.seal).where(Grant.seal.is_not(None))):
        ids[_split_seal(seal or "")[1] or "?"] += 1
    return ids


def _key_for_database(session: Session, settings: Settings, *, create: bool = True) -> SealKey:
    """Load (or, over a database with no sealed grant, create) the key, refusing one that did not seal it."""
    sealed = _seal_key_ids(session)
    total, ids = sum(sealed.values()), ", ".join(sorted(sealed))
    if sealed and settings.grant_seal_key is None and not settings.grant_seal_key_path.exists():
        raise GrantSealKeyError(
            f"the grant seal key file {settings.grant_seal_key_path} is missing, but {total} grant(s) in the "
            f"database are sealed (key id {ids}); a new key would refuse them all, so none is created: restore "
            f"the file or set {KEY_ENV} ({_DOCS})"
        )
    key = load_key(settings, create=create)
    if sealed and key.key_id not in sealed:
        raise GrantSealKeyError(
            f"the grant seal key ({key.source}, key id {key.key_id}) sealed none of the {total} sealed grant(s) "
            f"in the database (key id {ids}): restore the key that sealed them, or rotate with "
            f"`airlock ledger reseal-grants --previous-key FILE` ({_DOCS})"
        )
    return key


# ---------------------------------------------------------------- sealing and checking


def _split_seal(seal: str) -> tuple[str, str, str]:
    version, _, rest = seal.partition(":")
    key_id, _, mac = rest.partition(":")
    return version, key_id, mac


def _frozen(value: Any) -> Any:
    """Return a hashable stand-in for JSON-like ``value`` that tells types apart (``True`` is not ``1``)."""
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_frozen(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((str(k), _frozen(v)) for k, v in value.items()))
    return (type(value).__name__, value)


class GrantSealer:
    """Seals grants and checks their seals with one key."""

    CACHE_SIZE = 4096

    def __init__(self, key: SealKey) -> None:
        self.key = key
        self.key_id = key.key_id
        # Canonical JSON (pure-Python RFC 8785) costs far more than the HMAC; the MAC of terms already
        # seen is remembered, keyed by the terms themselves, so a request re-derives only those.
        self._macs: dict[Any, str] = {}
        self._lock = threading.Lock()

    def _mac(self, grant: Grant) -> str:
        terms = grant_terms(grant)
        key = _frozen(terms)
        try:
            mac = self._macs.get(key)
        except TypeError:  # an unhashable value (e.g. an edited JSON column): compute without the cache
            key, mac = None, None
        if mac is None:
            mac = hmac.new(self.key.secret, _MAC_DOMAIN + canonical_bytes(terms), hashlib.sha256).hexdigest()
            if key is not None:
                with self._lock:
                    if len(self._macs) >= self.CACHE_SIZE:
                        del self._macs[next(iter(self._macs))]
                    self._macs[key] = mac
        return mac

    def seal(self, grant: Grant) -> str:
        """Return the seal of ``grant``'s current terms (``gs1:<key id>:<HMAC-SHA256 hex>``)."""
        return f"{SEAL_VERSION}:{self.key_id}:{self._mac(grant)}"

    def failure(self, grant: Grant) -> str | None:
        """Return why ``grant`` fails its seal (a key of the reasons table), or None when it holds."""
        if not grant.seal:
            return "unsealed"
        version, key_id, mac = _split_seal(grant.seal)
        if version != SEAL_VERSION or len(mac) != 64:
            return "malformed"
        if key_id != self.key_id:
            return "other_key"
        try:
            expected = self._mac(grant)
        except CanonicalJSONError:  # e.g. a quota edited past 2^53: no honest grant holds one
            return "unencodable"
        return None if hmac.compare_digest(expected, mac) else "mismatch"

    def check(self, grant: Grant) -> None:
        """Raise GrantIntegrityError (and log at error level) unless ``grant`` matches its seal."""
        reason = self.failure(grant)
        if reason is not None:
            log.error(
                "grant %s failed its integrity check (%s): refused; its row was changed outside Airlock "
                "(run `airlock ledger check`)",
                grant.id,
                _REASONS[reason],
            )
            raise GrantIntegrityError(grant.id, reason)


_SEALERS: weakref.WeakKeyDictionary[Engine, GrantSealer] = weakref.WeakKeyDictionary()
_SEALERS_LOCK = threading.Lock()


def _engine_of(session: Session) -> Engine:
    bind = session.get_bind()
    return bind.engine if isinstance(bind, Connection) else bind


def sealer_for(session: Session) -> GrantSealer:
    """Return the sealer of the session's database, loading its key on first use (GrantSealKeyError if wrong).

    One key per database per process: the gateway installs it at start-up
    (:func:`prepare_grant_seals`); other callers (the CLI, tests) load it from the settings the
    first time, which creates the key file only while no grant in the database is sealed.
    """
    engine = _engine_of(session)
    sealer = _SEALERS.get(engine)
    if sealer is None:
        with _SEALERS_LOCK:
            sealer = _SEALERS.get(engine)
            if sealer is None:
                sealer = GrantSealer(_key_for_database(session, get_settings()))
                _SEALERS[engine] = sealer
    return sealer


def seal_grant(session: Session, grant: Grant) -> None:
    """Seal ``grant`` after the service created or changed it (flushed first: its id and times are sealed)."""
    grant.seal = sealer_for(session).seal(grant)


def check_grant(session: Session, grant: Grant) -> None:
    """Refuse a use of ``grant`` whose row fails its seal (403 alert); a key problem is a 500 without details."""
    try:
        sealer = sealer_for(session)
    except GrantSealKeyError as exc:
        log.error("grant %s could not be checked: %s", grant.id, exc.message)
        raise GrantSealUnavailableError(
            "the lab cannot check grants right now (its grant seal key is unavailable); the operator has been told"
        ) from None
    sealer.check(grant)


def grant_holds(session: Session, grant: Grant) -> bool:
    """Return whether ``grant`` matches its seal, for decisions that fail safe instead of refusing (logged)."""
    try:
        check_grant(session, grant)
    except (GrantIntegrityError, GrantSealUnavailableError):
        return False
    return True


def verified_grant(
    session: Session, grant_id: str, *, alert_db: Database | None = None, where: str = ""
) -> Grant | None:
    """Return grant ``grant_id`` (None if absent) after checking its seal.

    Outside a request (a job, a background task) pass ``alert_db``: a failed check is then also
    written to the audit trail as an ``alert`` row in its own transaction, since the caller's
    transaction rolls back with the error. A request's own audit row carries the alert otherwise.
    """
    grant = session.get(Grant, grant_id)
    if grant is None:
        return None
    try:
        check_grant(session, grant)
    except GrantIntegrityError as exc:
        if alert_db is not None:
            record_alert(alert_db, exc, evaluator_id=grant.evaluator_id, where=where or "background check")
        raise
    return grant


def record_alert(db: Database, exc: GrantIntegrityError, *, evaluator_id: str | None, where: str) -> None:
    """Write a grant integrity alert to the audit trail in its own transaction (never raises)."""
    try:
        with db.session() as session:
            session.add(
                AuditEvent(
                    request_id=new_id("alert"),
                    actor_type="system",
                    actor=where[:100],
                    evaluator_id=evaluator_id,
                    grant_id=exc.grant_id,
                    method="CHECK",
                    path=where[:200],
                    status_code=exc.status_code,
                    outcome=ALERT_OUTCOME,
                    error_code=exc.code,
                    detail=exc.audit_detail,
                )
            )
    except Exception:
        log.exception("could not write the integrity alert of grant %s to the audit trail", exc.grant_id)


# ---------------------------------------------------------------- reconciling with the ledger


@dataclass
class _Logged:
    issued: list[LoggedEvent] = field(default_factory=list)
    revoked: list[LoggedEvent] = field(default_factory=list)


def _logged_by_grant(session: Session) -> dict[str, _Logged]:

    found: dict[str, _Logged] = {}
    for event in logged_events(session, ("grant.issued", "grant.revoked")):
        grant_id = event.body.get("grant")
        if isinstance(grant_id, str):
            logged = found.setdefault(grant_id, _Logged())
            (logged.issued if event.kind == "grant.issued" else logged.revoked).append(event)
    return found


def _plain(value: Any) -> Any:
    """Return ``value`` as the JSON data a logged entry holds (datetimes as UTC ISO strings)."""
    return json.loads(canonical_text(value))


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def _differences(logged: Any, current: Any, prefix: str = "") -> dict[str, str]:
    """Name what differs between a logged value and the current one (``name -> 'logged X, now Y'``).

    A field the entry lacks is newer than the entry: the current value must then be its default
    (None, False, or the default its section of grant terms declares), which is what grants logged
    before the field existed were given.
    """
    if not (isinstance(logged, dict) and isinstance(current, dict)):
        return {} if logged == current else {prefix: f"logged {_short(logged)}, now {_short(current)}"}
    found: dict[str, str] = {}
    defaults = term_defaults()
    for key in sorted(set(logged) | set(current)):
        name = f"{prefix}.{key}" if prefix else key
        if key not in logged:
            if current[key] not in (None, False) and not (key in defaults and current[key] == defaults[key]):
                found[name] = f"not logged, now {_short(current[key])}"
        elif logged[key] != current.get(key):
            found[name] = f"logged {_short(logged[key])}, now {_short(current.get(key))}"
    return found


def _event_differences(event: LoggedEvent, body: dict[str, Any], confidential: dict[str, Any]) -> list[str]:
    """Compare a logged event with the body and confidential fields recomputed from the row."""
    found = _differences(event.body, _plain(body))
    for name, commitment in sorted(event.commitments.items()):
        if name not in confidential:
            continue
        opening = event.openings.get(name)
        if opening is None or commitment_of(opening[0], opening[1]) != commitment:
            found[name] = "its committed value cannot be opened (the kept opening is missing or altered)"
            continue
        # The terms commitment names columns directly; the others are prefixed by their field.
        more = _differences(json.loads(opening[1]), _plain(confidential[name]), "" if name == "terms" else name)
        found |= {k: v for k, v in more.items() if k not in found}
    return [f"{name} ({how})" for name, how in found.items()]


def _ledger_problems(session: Session, grant: Grant, logged: _Logged | None) -> list[str]:
    """Return how ``grant``'s row disagrees with its ``grant.issued`` / ``grant.revoked`` entries."""
    logged = logged or _Logged()
    problems: list[str] = []
    if not logged.issued:
        problems.append("has no grant.issued entry in the ledger")
    else:
        if len(logged.issued) > 1:
            problems.append(f"is logged as issued {len(logged.issued)} times")
        issued = logged.issued[0]
        try:
            diffs = _event_differences(issued, *events.grant_issued_event(session, grant))
        except CanonicalJSONError as exc:
            diffs = [f"a value canonical JSON cannot represent ({exc})"]
        if diffs:
            problems.append(f"differs from its grant.issued entry {issued.event_id}: " + "; ".join(diffs))
    if grant.revoked_at is None:
        if logged.revoked:
            revoked = logged.revoked[0]
            problems.append(
                f"is live, but the ledger records its revocation at {revoked.body.get('revoked_at')} "
                f"({revoked.event_id})"
            )
    elif not logged.revoked:
        problems.append("is revoked, but the ledger has no grant.revoked entry for it")
    else:
        revoked = logged.revoked[0]
        diffs = _event_differences(revoked, *events.grant_revoked_event(session, grant))
        if diffs:
            problems.append(f"differs from its grant.revoked entry {revoked.event_id}: " + "; ".join(diffs))
    return problems


def check_grants(session: Session, settings: Settings | None = None) -> list[str]:
    """Lab-side check of every grant: its seal, and its terms against its ledger entries; one line per grant.

    Reported: a row that fails its seal; terms that differ from the ``grant.issued`` entry (public
    body and committed values, ``terms`` naming every column); a grant with no ``grant.issued``
    entry; a live grant whose revocation was logged, or a revocation that differs from its entry;
    a logged grant missing from the database. Never creates a key.
    """
    problems: list[str] = []
    # The entries before the rows: a grant and its entries commit together, so every grant logged by
    # then is in the rows read next. A grant issued or revoked in between is read with entries
    # missing; its entries are read again before anything is reported (the gateway may be running).
    logged = _logged_by_grant(session)
    logged_first = set(logged)
    grants = list(session.scalars(select(Grant).order_by(Grant.created_at, Grant.id)))
    sealer: GrantSealer | None = None
    if grants:
        try:
            sealer = GrantSealer(_key_for_database(session, settings or get_settings(), create=False))
        except GrantSealKeyError as exc:
            problems.append(f"grant seals were not checked: {exc.message}")
    names = dict(session.execute(select(Evaluator.id, Evaluator.name)).tuples().all())
    reread = False
    for grant in grants:
        issues: list[str] = []
        reason = sealer.failure(grant) if sealer is not None else None
        if reason is not None:
            issues.append(f"fails its seal ({_REASONS[reason]})")
        ledger = _ledger_problems(session, grant, logged.get(grant.id))
        if ledger and not reread:
            logged, reread = _logged_by_grant(session), True
            ledger = _ledger_problems(session, grant, logged.get(grant.id))
        issues += ledger
        if issues:
            who = names.get(grant.evaluator_id, grant.evaluator_id)
            problems.append(f"grant {grant.id} ({who}): " + "; ".join(issues))
    for grant_id in sorted(logged_first - {g.id for g in grants}):
        problems.append(f"grant {grant_id}: logged in the ledger, but the database has no such grant")
    return problems


# ---------------------------------------------------------------- start-up and rotation


def _install(db: Database, sealer: GrantSealer) -> None:
    with _SEALERS_LOCK:
        _SEALERS[db.engine] = sealer


def prepare_grant_seals(db: Database, settings: Settings) -> GrantSealer:
    """At start-up: load (over an unsealed database, create) the key, seal grants issued before seals, install it.

    A grant without a seal is sealed here once its terms match its ``grant.issued`` (and
    ``grant.revoked``) entries, so clearing a widened row's seal does not get it sealed; one that
    differs stays unsealed, is refused at every use, and is logged at error level. Raises
    GrantSealKeyError (the start fails) for a missing key over sealed grants or a key that sealed
    none of them.
    """
    with db.session() as session:
        sealer = GrantSealer(_key_for_database(session, settings))
        unsealed = list(session.scalars(select(Grant).where(Grant.seal.is_(None)).order_by(Grant.created_at)))
        logged = _logged_by_grant(session) if unsealed else {}
        for grant in unsealed:
            problems = _ledger_problems(session, grant, logged.get(grant.id))
            if problems:
                log.error("grant %s has no seal and %s: left unsealed, so it is refused", grant.id, "; ".join(problems))
            else:
                grant.seal = sealer.seal(grant)
                log.warning("sealed grant %s (issued before grant seals; its terms match its ledger entries)", grant.id)
    _install(db, sealer)
    return sealer


@dataclass(frozen=True)
class ResealReport:
    """What :func:`reseal_grants` did."""

    key_id: str
    key_source: str
    resealed: int
    already: int
    refused: list[tuple[str, str]]
    """``(grant id, why)`` for every grant that failed its seal under the previous key: left as it was."""


def reseal_grants(db: Database, settings: Settings, previous: SealKey) -> ResealReport:
    """Rotate the seal key: re-seal under the configured key every grant whose seal holds under ``previous``.

    The configured key (``AIRLOCK_GRANT_SEAL_KEY`` or the key file, created here if absent) is the
    new one. A grant that fails its seal under the previous key keeps its old seal, so it stays
    refused: rotation never launders an edited row.
    """
    current = load_key(settings, create=True)
    new, old = GrantSealer(current), GrantSealer(previous)
    resealed = already = 0
    refused: list[tuple[str, str]] = []
    with db.session() as session:
        for grant in session.scalars(select(Grant).order_by(Grant.created_at, Grant.id)):
            if new.failure(grant) is None:
                already += 1
                continue
            reason = old.failure(grant)
            if reason is None:
                grant.seal = new.seal(grant)
                resealed += 1
            else:
                refused.append((grant.id, _REASONS[reason]))
    _install(db, new)
    return ResealReport(new.key_id, current.source, resealed, already, refused)
