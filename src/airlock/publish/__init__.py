"""Publication: evaluator reports, redaction commitments, embargo, public report pages.

The public surface is what a third party needs to check a published report; the rest (tables,
service, routes, CLI) is the platform's own.
"""

from airlock.publish.redaction import commit, placeholder, verify_commitment

__all__ = [
    "cli",
    "commit",
    "models",
    "placeholder",
    "routes",
    "service",
    "verify_commitment",
]
