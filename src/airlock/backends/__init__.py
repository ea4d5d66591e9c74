"""Model backends: the ModelBackend interface, local and upstream implementations, mitigations."""

# The modules other packages may import (a test holds every import across packages to this list).
__all__ = [
    "base",
    "local",
    "noise",
    "pool",
    "protocol",
    "registry",
    "tokenization",
    "watermark",
    "weights",
]
