"""The registry: models, versions, variants and mitigations."""

# The modules other packages may import (a test holds every import across packages to this list).
__all__ = [
    "events",
    "models",
    "routes",
    "schemas",
    "service",
    "weights",
]
