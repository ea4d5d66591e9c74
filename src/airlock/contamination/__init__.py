"""Contamination firewall: evaluators register salted fingerprints of private test sets; the lab checks corpora.

It stands beside ``leak`` above ``access`` (grants, evaluators) and ``ledger`` (registrations and
checks are ledger events); nothing below the interface imports it.
"""

# The modules other packages may import (a test holds every import across packages to this list).
__all__ = ["cli", "corpus", "events", "matcher", "models", "routes", "schemas", "scheme", "service"]
