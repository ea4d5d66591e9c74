"""Model backends: the ModelBackend interface, local and upstream implementations, mitigations."""
