"""Governance: frontier-safety policy, safety case per mitigation, deployment gate, overrides."""

from airlock.governance.policy import Policy, load_policy, parse_policy
from airlock.governance.service import (
    GateBlockedError,
    OverrideRequest,
    Promotion,
    evaluate_gate,
    promote,
    trend,
)

__all__ = [
    "GateBlockedError",
    "OverrideRequest",
    "Policy",
    "Promotion",
    "calls",
    "cli",
    "evaluate_gate",
    "load_policy",
    "models",
    "parse_policy",
    "promote",
    "routes",
    "service",
    "trend",
]
