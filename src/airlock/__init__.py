"""Airlock: structured pre-deployment access to frontier models for external evaluators."""

__version__ = "0.1.0"
__all__ = ["__version__"]
