"""A grant's terms as data: typed sections each capability contributes, and what the seal and ledger cover.

A grant row holds who may do what (evaluator, model, versions, variants, scopes, validity) in
columns, and everything else a capability needs to know — quotas, switches, embargo — in one JSON
``terms`` column. Each capability declares its part as a :class:`Terms` section (a pydantic model
with defaults) in its own package and registers it, so a new quota touches that package only::

    @register_terms
    class FinetuneTerms(Terms):
        section: ClassVar[str] = "finetune"
        quota_finetune_jobs: PositiveInt | None = None

Built-in sections are found through the ``airlock.terms`` entry-point group (a third-party
capability adds its own the same way); importing a section's module registers it too. Term names
are flat and unique across sections, and a grant stores only the terms that differ from their
defaults, so adding a term (with a default) leaves every existing seal and ledger entry valid.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy import inspect
from sqlalchemy.orm import Mapper

from airlock.access.models import Grant
from airlock.errors import ConfigError, InvalidRequestError

__all__ = [
    "ENTRY_POINT_GROUP",
    "EXCLUDED_COLUMNS",
    "REVOCATION_COLUMNS",
    "Terms",
    "TermsError",
    "all_terms",
    "grant_terms",
    "issued_terms",
    "ledger_terms",
    "register_terms",
    "row_terms",
    "sealed_columns",
    "sealed_keys",
    "term_defaults",
    "terms_of",
    "validate_terms",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "airlock.terms"
EXCLUDED_COLUMNS = frozenset({"seal", "tokens_used"})
"""Bookkeeping, not terms: the seal itself, and the usage counter the audit writer adds to."""
REVOCATION_COLUMNS = ("revoked_at", "revoked_reason")
TERMS_COLUMN = "terms"
"""The JSON column whose entries are sealed and logged as if each were a column of its own."""


class TermsError(InvalidRequestError):
    """A grant term that no capability declares, or a value its section refuses."""

    default_code = "invalid_grant_terms"


class Terms(BaseModel):
    """Base of a capability's grant terms: flat typed fields, each with a default that grants nothing extra."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    section: ClassVar[str]
    """The section's name (the capability), unique among sections."""
    public_terms: ClassVar[tuple[str, ...]] = ()
    """Terms logged in the public body of ``grant.issued`` (the rest is committed, not published)."""
    ledger_quota_names: ClassVar[dict[str, str]] = {}
    """Terms logged under ``grant.issued``'s committed ``quotas`` field, by their name there."""


TermsT = TypeVar("TermsT", bound=Terms)

_sections: dict[str, type[Terms]] = {}
_owner: dict[str, str] = {}  # term name -> section
_entry_points_loaded = False


def register_terms(cls: type[TermsT]) -> type[TermsT]:
    """Register a section of grant terms (a class decorator); its term names must be new."""
    section = getattr(cls, "section", None)
    if not isinstance(section, str) or not section:
        raise ConfigError(f"{cls.__qualname__} declares no section name")
    if _sections.get(section, cls) is not cls:
        raise ConfigError(f"two sections of grant terms are named {section!r}")
    clashes = [name for name in cls.model_fields if _owner.get(name, section) != section]
    if clashes:
        raise ConfigError(f"grant terms {clashes} of section {section!r} are already declared by another section")
    _sections[section] = cls
    for name in cls.model_fields:
        _owner[name] = section
    return cls


def all_terms() -> dict[str, type[Terms]]:
    """Return every registered section by name, loading the ``airlock.terms`` entry points once."""
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for point in entry_points(group=ENTRY_POINT_GROUP):
            try:
                target = point.load()
            except Exception as exc:  # a broken plugin must name itself, not take the gateway down
                raise ConfigError(f"grant terms {point.name!r} ({point.value}) could not be loaded: {exc}") from exc
            if isinstance(target, type) and issubclass(target, Terms) and target.section not in _sections:
                register_terms(target)
    return dict(sorted(_sections.items()))


def term_defaults() -> dict[str, Any]:
    """Return every declared term with its default value."""
    return {
        name: field.get_default(call_default_factory=True)
        for cls in all_terms().values()
        for name, field in cls.model_fields.items()
    }


def validate_terms(values: Mapping[str, Any]) -> dict[str, Any]:
    """Check terms given flat (``{"quota_total_tokens": 5}``) or by section; return them flat, defaults left out.

    Raises :class:`TermsError` (400 ``invalid_grant_terms``, ``param`` naming the term) for a name no
    section declares or a value its section refuses.
    """
    sections = all_terms()
    flat: dict[str, Any] = {}
    for name, value in values.items():
        if name in sections and isinstance(value, Mapping):
            for inner, inner_value in value.items():
                if _owner.get(inner) != name:
                    raise TermsError(f"section {name!r} has no grant term {inner!r}", param=f"terms.{name}.{inner}")
                flat[inner] = inner_value
        else:
            flat[name] = value
    grouped: dict[str, dict[str, Any]] = {}
    for name, value in flat.items():
        section = _owner.get(name)
        if section is None:
            known = ", ".join(sorted(_owner)) or "none"
            raise TermsError(f"unknown grant term {name!r} (known: {known})", param=f"terms.{name}")
        grouped.setdefault(section, {})[name] = value
    result: dict[str, Any] = {}
    for section, given in grouped.items():
        try:
            parsed = sections[section].model_validate(given)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"]) or section
            raise TermsError(f"grant term {where!r}: {error['msg']}", param=f"terms.{where}") from None
        result.update(parsed.model_dump(mode="json", exclude_defaults=True))
    return dict(sorted(result.items()))


def terms_of(grant: Grant | None, section: type[TermsT]) -> TermsT:
    """Return ``section``'s terms of ``grant`` (its defaults for no grant, or for terms it does not set)."""
    stored = (grant.terms or {}) if grant is not None else {}
    mine = {name: stored[name] for name in section.model_fields if name in stored}
    return section.model_validate(mine)


def ledger_terms(grant: Grant) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the terms ``grant.issued`` publishes and the quotas it commits to, every declared one included."""
    public: dict[str, Any] = {}
    quotas: dict[str, Any] = {}
    for cls in all_terms().values():
        values = terms_of(grant, cls)
        for name in cls.public_terms:
            public[name] = getattr(values, name)
        for name, logged_as in cls.ledger_quota_names.items():
            quotas[logged_as] = getattr(values, name)
    return public, quotas


# ---------------------------------------------------------------- what the seal covers

_TERM_COLUMNS: dict[type, tuple[tuple[str, str, Any], ...]] = {}


def _term_columns(model: type) -> tuple[tuple[str, str, Any], ...]:
    """Return ``(attribute, column name, scalar default)`` for every sealed column of ``model`` (read once)."""
    found = _TERM_COLUMNS.get(model)
    if found is None:
        mapper: Mapper[Any] = inspect(model)
        columns = []
        for attr in mapper.column_attrs:
            column = attr.columns[0]
            if column.name in EXCLUDED_COLUMNS:
                continue
            default = column.default.arg if column.default is not None and column.default.is_scalar else None
            columns.append((attr.key, column.name, default))
        found = _TERM_COLUMNS[model] = tuple(columns)
    return found


def _column_names() -> set[str]:
    return {name for _key, name, _default in _term_columns(Grant)}


def row_terms(row: Any) -> dict[str, Any]:
    """Return the canonical terms of a mapped row: every column but the excluded ones, defaults left out.

    The entries of a ``terms`` JSON column count as columns of their own (the column itself is not
    named), so moving a column into it changes no seal and no logged entry.
    """
    terms: dict[str, Any] = {}
    for key, name, default in _term_columns(type(row)):
        value = getattr(row, key)
        if name == TERMS_COLUMN and isinstance(value, dict):
            terms.update({k: v for k, v in value.items() if v is not None})
            continue
        if value is None or (default is not None and type(value) is type(default) and value == default):
            continue
        terms[name] = value
    return dict(sorted(terms.items()))


def sealed_columns() -> tuple[str, ...]:
    """Return the names of the ``grants`` columns the seal covers, sorted."""
    return tuple(sorted(_column_names()))


def sealed_keys() -> tuple[str, ...]:
    """Return every name the seal can cover: the sealed columns but ``terms``, and every declared term."""
    return tuple(sorted((_column_names() - {TERMS_COLUMN}) | set(term_defaults())))


def grant_terms(grant: Grant) -> dict[str, Any]:
    """Return what the seal covers: every term of ``grant``, its revocation included."""
    return row_terms(grant)


def issued_terms(grant: Grant) -> dict[str, Any]:
    """Return the grant's terms without its revocation: what ``grant.issued`` commits to."""
    return {k: v for k, v in grant_terms(grant).items() if k not in REVOCATION_COLUMNS}
