"""Red-teaming: experts' sessions with granted variants, their transcripts and findings, and the lab's triage.

It stands below governance (the gate counts open high and critical findings against a variant's
claimed mitigations) and above serving (every turn is sampled through the variant's mitigation
pipeline, under the grant's quotas).
"""

# The modules other packages may import (a test holds every import across packages to this list).
__all__ = [
    "cli",
    "events",
    "models",
    "routes",
    "schemas",
    "service",
    "terms",
]
