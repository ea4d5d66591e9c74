"""Leak attribution: each grant's watermark key, and tracing a leaked text back to the grant that sampled it."""

# The modules other packages may import (a test holds every import across packages to this list).
__all__ = ["cli", "keys", "trace"]
