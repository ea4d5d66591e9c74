"""Evaluations: Inspect provider and sandbox, built-in proxy suites, attested results."""

# The modules other packages may import (a test holds every import across packages to this list).
__all__ = [
    "attestation",
    "client",
    "elicitation",
    "events",
    "models",
    "reporting",
    "routes",
    "schemas",
    "service",
    "terms",
]
