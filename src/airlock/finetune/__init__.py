"""Fine-tuning access: training files (``/v1/files``), fine-tuning jobs, noise-injected variants."""

# The modules other packages may import (a test holds every import across packages to this list).
__all__ = [
    "adapters",
    "events",
    "jobs",
    "models",
    "noise",
    "routes",
    "service",
    "terms",
]
