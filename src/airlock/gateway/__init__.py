"""The HTTP gateway: OpenAI-compatible routes, admin API, errors, audit middleware."""
