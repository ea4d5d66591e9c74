"""The worker plane on Ray: model workers as actors placed by the weights they hold, jobs as tasks beside them."""

# The modules other packages may import (a test holds every import across packages to this list).
__all__ = [
    "executor",
    "placement",
    "worker",
]
