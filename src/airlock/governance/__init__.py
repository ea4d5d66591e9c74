"""Governance: frontier-safety policy, safety case per mitigation, deployment gate, overrides."""
