"""Sampling: the OpenAI surface (models, chat and text completions), the model-id resolver, variant pipelines."""

# The modules other packages may import (a test holds every import across packages to this list).
__all__ = [
    "pipelines",
    "responses",
    "routes",
    "service",
]
