"""The HTTP kit every capability's routes use: OpenAI-shaped errors, method routing, uploads, the OpenAPI document.

It knows no capability: what it needs from above (which dependencies carry which credential) is
handed to it by the app.
"""

# The modules other packages may import (a test holds every import across packages to this list).
__all__ = [
    "errors",
    "health",
    "openapi",
    "routing",
    "uploads",
]
