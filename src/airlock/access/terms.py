"""A grant's terms as data: the columns that decide what a grant allows (what the seal covers and the ledger logs)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import inspect
from sqlalchemy.orm import Mapper

from airlock.access.models import Grant

__all__ = ["EXCLUDED_COLUMNS", "REVOCATION_COLUMNS", "grant_terms", "issued_terms", "row_terms", "sealed_columns"]

EXCLUDED_COLUMNS = frozenset({"seal", "tokens_used"})
"""Bookkeeping, not terms: the seal itself, and the usage counter the audit writer adds to."""
REVOCATION_COLUMNS = ("revoked_at", "revoked_reason")


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


def row_terms(row: Any) -> dict[str, Any]:
    """Return the canonical terms of a mapped row: every column but the excluded ones, defaults left out."""
    terms: dict[str, Any] = {}
    for key, name, default in _term_columns(type(row)):
        value = getattr(row, key)
        if value is None or (default is not None and type(value) is type(default) and value == default):
            continue
        terms[name] = value
    return terms


def sealed_columns() -> tuple[str, ...]:
    """Return the names of the ``grants`` columns the seal covers, sorted."""
    return tuple(sorted(name for _key, name, _default in _term_columns(Grant)))


def grant_terms(grant: Grant) -> dict[str, Any]:
    """Return what the seal covers: every term of ``grant``, its revocation included."""
    return row_terms(grant)


def issued_terms(grant: Grant) -> dict[str, Any]:
    """Return the grant's terms without its revocation: what ``grant.issued`` commits to."""
    return {k: v for k, v in grant_terms(grant).items() if k not in REVOCATION_COLUMNS}
