"""The HTTP kit: OpenAI-shaped errors, method routing, uploads, the OpenAPI document, the server protocol.

It knows no capability: what it needs from above (which dependencies carry which credential) is
handed to it by the app.
"""

# The modules other packages may import (a test holds every import across packages to this list).
__all__ = [
    "errors",
    "health",
    "openapi",
    "routing",
    "server",
    "uploads",
]
