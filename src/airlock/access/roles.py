"""Lab roles for admin tokens: the one table of what each role may do, and the checks built on it.

Separation of duties is a property of the table, checked when this module is imported: no role
both issues access (grants, evaluator keys) and approves what that access produced (interp
results, reports). A second, per-token check refuses a review of work that came from a grant the
same token issued, so the rule holds even if the table is later widened.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from airlock.access.models import Grant
from airlock.errors import InvalidRequestError, PermissionDeniedError


class Role(StrEnum):
    """A lab role, chosen when an admin token is created (``airlock admin token NAME --role ...``)."""

    ADMIN = "admin"
    REVIEWER = "reviewer"
    DECIDER = "decider"
    AUDITOR = "auditor"


class Permission(StrEnum):
    """One thing an admin route (or a CLI path acting for a token) lets a lab token do."""

    EVALUATORS_READ = "evaluators:read"
    EVALUATORS_MANAGE = "evaluators:manage"
    GRANTS_READ = "grants:read"
    GRANTS_ISSUE = "grants:issue"
    KEYS_ISSUE = "keys:issue"
    ACCESS_REVOKE = "access:revoke"
    AUDIT_READ = "audit:read"
    REGISTRY_READ = "registry:read"
    REGISTRY_MANAGE = "registry:manage"
    STAGE_CHANGE = "stage:change"
    GATE_READ = "gate:read"
    RESULTS_READ = "results:read"
    INTERP_REVIEW_READ = "interp-review:read"
    INTERP_REVIEW_DECIDE = "interp-review:decide"
    REPORTS_READ = "reports:read"
    REPORTS_REVIEW = "reports:review"
    LEDGER_CHECKPOINT = "ledger:checkpoint"
    REDTEAM_READ = "redteam:read"
    REDTEAM_TRIAGE = "redteam:triage"
    CONTAMINATION_READ = "contamination:read"
    CONTAMINATION_CHECK = "contamination:check"
    SEALED_READ = "sealed:read"


DESCRIPTIONS: Mapping[Permission, str] = {
    Permission.EVALUATORS_READ: "list evaluator organisations",
    Permission.EVALUATORS_MANAGE: "register evaluator organisations",
    Permission.GRANTS_READ: "read grants",
    Permission.GRANTS_ISSUE: "issue grants",
    Permission.KEYS_ISSUE: "mint evaluator API keys",
    Permission.ACCESS_REVOKE: "revoke grants and API keys",
    Permission.AUDIT_READ: "read the audit trail",
    Permission.REGISTRY_READ: "list models, versions and variants",
    Permission.REGISTRY_MANAGE: "sync the model manifest",
    Permission.STAGE_CHANGE: "change a version's stage (through the deployment gate)",
    Permission.GATE_READ: "read the policy, gate reports, decisions and trends",
    Permission.RESULTS_READ: "read attested eval results",
    Permission.INTERP_REVIEW_READ: "read the interp review queue",
    Permission.INTERP_REVIEW_DECIDE: "approve or deny held interp results",
    Permission.REPORTS_READ: "read submitted reports",
    Permission.REPORTS_REVIEW: "comment on reports and agree to their early release",
    Permission.LEDGER_CHECKPOINT: "integrate pending ledger events and sign a checkpoint",
    Permission.REDTEAM_READ: "read red-teaming findings and the transcripts they cite",
    Permission.REDTEAM_TRIAGE: "triage red-teaming findings (acknowledge, dispute, mark fixed)",
    Permission.CONTAMINATION_READ: "list contamination registrations (counts, never hashes) and checks",
    Permission.CONTAMINATION_CHECK: "receive evaluators' test-set fingerprints to check a training corpus",
    Permission.SEALED_READ: "list sealed items (metadata) and read the ones their evaluators released",
}

ROLE_DESCRIPTIONS: Mapping[Role, str] = {
    Role.ADMIN: "runs the lab platform: models and manifest, evaluators, grants, keys, revocation",
    Role.REVIEWER: "reviews held interp results, submitted reports and red-teaming findings (triage)",
    Role.DECIDER: "moves versions between stages; overrides a blocking gate when the policy names this role",
    Role.AUDITOR: "reads the audit trail, grants, evaluators, results and reports; signs ledger checkpoints",
}

_EVERYONE = frozenset({Permission.REGISTRY_READ, Permission.GATE_READ, Permission.RESULTS_READ})

ROLE_PERMISSIONS: Mapping[Role, frozenset[Permission]] = {
    Role.ADMIN: _EVERYONE
    | {
        Permission.EVALUATORS_READ,
        Permission.EVALUATORS_MANAGE,
        Permission.GRANTS_READ,
        Permission.GRANTS_ISSUE,
        Permission.KEYS_ISSUE,
        Permission.ACCESS_REVOKE,
        Permission.AUDIT_READ,
        Permission.REGISTRY_MANAGE,
        Permission.STAGE_CHANGE,
        Permission.REPORTS_READ,
        Permission.LEDGER_CHECKPOINT,
        Permission.REDTEAM_READ,
        Permission.CONTAMINATION_READ,
        Permission.CONTAMINATION_CHECK,
        Permission.SEALED_READ,
    },
    Role.REVIEWER: _EVERYONE
    | {
        Permission.INTERP_REVIEW_READ,
        Permission.INTERP_REVIEW_DECIDE,
        Permission.REPORTS_READ,
        Permission.REPORTS_REVIEW,
        Permission.REDTEAM_READ,
        Permission.REDTEAM_TRIAGE,
        Permission.SEALED_READ,
    },
    Role.DECIDER: _EVERYONE | {Permission.STAGE_CHANGE},
    Role.AUDITOR: _EVERYONE
    | {
        Permission.EVALUATORS_READ,
        Permission.GRANTS_READ,
        Permission.AUDIT_READ,
        Permission.INTERP_REVIEW_READ,
        Permission.REPORTS_READ,
        Permission.LEDGER_CHECKPOINT,
        Permission.REDTEAM_READ,
        Permission.CONTAMINATION_READ,
        Permission.SEALED_READ,
    },
}

ISSUES_ACCESS = frozenset({Permission.GRANTS_ISSUE, Permission.KEYS_ISSUE})
APPROVES_WORK = frozenset({Permission.INTERP_REVIEW_DECIDE, Permission.REPORTS_REVIEW, Permission.REDTEAM_TRIAGE})


def separation_conflicts(matrix: Mapping[Role, frozenset[Permission]]) -> list[Role]:
    """Return the roles of ``matrix`` that could both issue access and approve what it produced."""
    return [role for role, held in matrix.items() if held & ISSUES_ACCESS and held & APPROVES_WORK]


def _check_matrix() -> None:
    conflicts = separation_conflicts(ROLE_PERMISSIONS)
    if conflicts:
        raise RuntimeError(f"roles {conflicts} could both issue access and approve its results")
    if set(ROLE_PERMISSIONS) != set(Role) or set(DESCRIPTIONS) != set(Permission):
        raise RuntimeError("every role needs a row and every permission a description")


_check_matrix()

ROLE_NAMES: tuple[str, ...] = tuple(role.value for role in Role)


def parse_role(value: str) -> Role:
    """Return the role named ``value``; 400 ``unknown_role`` listing the valid roles otherwise."""
    try:
        return Role(value.strip())
    except ValueError:
        raise InvalidRequestError(
            f"unknown lab role {value!r}; valid roles: {', '.join(ROLE_NAMES)}", code="unknown_role", param="role"
        ) from None


def permissions_of(role: str) -> frozenset[Permission]:
    """Return what a token of ``role`` may do (nothing for a role this version does not know)."""
    try:
        return ROLE_PERMISSIONS[Role(role)]
    except ValueError:
        return frozenset()


def roles_with(permission: Permission) -> list[Role]:
    """Return the roles holding ``permission``, in declaration order."""
    return [role for role in Role if permission in ROLE_PERMISSIONS[role]]


def _either(roles: Iterable[Role]) -> str:
    names = [f"'{role.value}'" for role in roles]
    return " or ".join(names) if names else "no role"


def check_permission(role: str, permission: Permission) -> None:
    """Refuse (403 ``role_not_allowed``) a lab token whose role lacks ``permission``."""
    if permission in permissions_of(role):
        return
    raise PermissionDeniedError(
        f"role {role!r} may not {DESCRIPTIONS[permission]} ({permission.value}); "
        f"this needs a lab token with role {_either(roles_with(permission))}",
        code="role_not_allowed",
    )


def check_independent_review(session: Session, token_id: str, grant_id: str, what: str) -> None:
    """Refuse (403 ``issuer_cannot_review``) a review by the admin token that issued the work's grant."""
    issuer = session.scalar(select(Grant.issued_by_token_id).where(Grant.id == grant_id))
    if issuer is not None and issuer == token_id:
        raise PermissionDeniedError(
            f"this token issued grant {grant_id}, so it may not review {what} produced under it; "
            "ask a reviewer who did not issue the grant",
            code="issuer_cannot_review",
        )
