"""Fine-tuning access: training files (``/v1/files``) and, later, fine-tuning jobs."""

# The modules other packages may import (a test holds every import across packages to this list).
__all__ = [
    "adapters",
    "events",
    "jobs",
    "models",
    "routes",
    "service",
]
