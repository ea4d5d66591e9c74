"""Access control: evaluators, grants, keys, quotas and the audit trail."""

# The modules other packages may import (a test holds every import across packages to this list).
__all__ = [
    "acceptance",
    "audit",
    "cache",
    "cli",
    "events",
    "metrics",
    "middleware",
    "models",
    "quotas",
    "retention",
    "roles",
    "routes",
    "schemas",
    "seal",
    "sealing",
    "service",
    "terms",
]
