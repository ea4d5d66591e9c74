"""Which methods the application's routes accept on a path: the ``Allow`` header of 405 and OPTIONS answers."""

from __future__ import annotations

from typing import Any

from fastapi.routing import iter_route_contexts

# RFC 9110 order, so a header reads the same whatever order the routes were declared in.
_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _sorted(methods: set[str]) -> list[str]:
    return sorted(methods, key=lambda m: (_ORDER.index(m) if m in _ORDER else len(_ORDER), m))


def route_methods(app: Any, path: str, *, documented_only: bool = False) -> list[str]:
    """Return the methods of the routes that own ``path`` (documented routes only, if asked).

    Where several patterns match, the most specific own the path: the ones with the fewest
    parameters (``POST /reports/attachments``, not ``GET /reports/{report_id}``).
    """
    documented: dict[int, set[str]] = {}
    hidden: dict[int, set[str]] = {}
    for route in iter_route_contexts(app.routes):
        regex = getattr(route, "path_regex", None)
        methods = route.methods
        if regex is None or not methods or not regex.match(path):
            continue
        params = len(getattr(route, "param_convertors", None) or {})
        found = documented if getattr(route, "include_in_schema", True) else hidden
        found.setdefault(params, set()).update(methods)
    chosen = documented if documented or documented_only else hidden
    return _sorted(chosen[min(chosen)]) if chosen else []


def allowed_methods(app: Any, path: str) -> list[str]:
    """Return the methods ``path`` supports, OPTIONS included; empty when no route serves it.

    A route hidden from the OpenAPI document (a catch-all such as the fine-tuning weights refusal)
    counts only where no documented route matches: it must not add GET to ``…/cancel``.
    """
    methods = route_methods(app, path)
    return [*methods, "OPTIONS"] if methods else []
