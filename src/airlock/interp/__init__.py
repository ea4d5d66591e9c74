"""Remote interpretability: evaluator code runs sandboxed against private weights; only results leave."""

# The modules other packages may import (a test holds every import across packages to this list).
__all__ = [
    "cli",
    "client",
    "jobs",
    "models",
    "nnsight",
    "routes",
    "service",
    "terms",
]
