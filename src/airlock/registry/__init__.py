"""The registry: models, versions, variants and mitigations."""
