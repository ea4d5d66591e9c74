"""The lab's frontier-safety policy (``policy.yaml``): schema, loader and fingerprint.

The shape follows the published frontier-safety frameworks: risk domains with capability
thresholds, the evals (metric, threshold, early-warning buffer) that rule each threshold in or
out, the minimum elicitation for evidence to count, the safeguards a crossed threshold requires,
re-evaluation triggers, the safety case for mitigations, and the roles of the people involved.
Every model rejects unknown keys so a typo fails loudly instead of silently weakening the gate.
Field reference: ``docs/governance.md``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from airlock.canonical import sha256_hex
from airlock.errors import ConfigError
from airlock.evals.elicitation import DEFAULT_ALPHA, DEFAULT_FEW_SHOT_MIN_GAIN
from airlock.registry.service import format_validation_error

POLICY_VERSION = 1
Role = Literal["admin", "reviewer", "decider"]
GatedStage = Literal["internal", "external-candidate", "deployed"]
_SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def _slug(value: str) -> str:
    if not _SLUG_RE.match(value):
        raise ValueError(f"{value!r} is not a valid id: use lower-case letters, digits, '.', '_' or '-' (max 64)")
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Slug = Annotated[str, AfterValidator(_slug)]
Finite = Annotated[float, AfterValidator(_finite)]


def _unique(values: list[str], what: str) -> None:
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        raise ValueError(f"duplicate {what}: {', '.join(dupes)}")


class PolicyModel(BaseModel):
    """Base of every policy model: unknown keys are errors, parsed policies are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Roles(PolicyModel):
    """Which admin-token role prepares, reviews and decides (``airlock admin token NAME --role ...``)."""

    prepares: Role = Field(default="admin", description="Runs or commissions the evals and prepares the report.")
    reviews: Role = Field(default="reviewer", description="Reviews the evidence and the gate report.")
    decides: Role = Field(
        default="decider", description="Decides deployment; the only role that may override a blocking gate."
    )


class Gate(PolicyModel):
    """Which stage transitions must pass the gate."""

    stages: list[GatedStage] = Field(
        min_length=1, description="Stages a version may only enter when the gate allows it (or a decider overrides)."
    )

    @model_validator(mode="after")
    def _deployed_is_gated(self) -> Gate:
        _unique(list(self.stages), "stages")
        # Fail closed: a policy that does not gate deployment would make the whole gate decorative.
        if "deployed" not in self.stages:
            raise ValueError("`deployed` must be a gated stage")
        return self


class Reevaluation(PolicyModel):
    """When earlier evidence stops counting, so that the gate asks for fresh evals."""

    new_version: bool = Field(
        default=True,
        description="True: only results on this very version count. False: results on earlier versions of the "
        "same model count too (listed as inherited).",
    )
    stage_change: bool = Field(
        default=False, description="True: results older than the version's last stage change do not count."
    )
    max_evidence_age_days: int | None = Field(
        default=180, ge=1, description="Results older than this do not count (null: no limit)."
    )


class Elicitation(PolicyModel):
    """The minimum elicitation for a result to count as evidence about a threshold."""

    variants: list[str] = Field(
        min_length=1, description="Variants whose results count, e.g. `helpful-only` (no harmlessness mitigations)."
    )
    fine_tuned: Literal["any", "required", "forbidden"] = Field(
        default="any", description="Whether results from a fine-tuned model are required, allowed or excluded."
    )
    min_samples: int = Field(ge=1, description="Fewest scored samples a result needs.")
    min_epochs: int = Field(default=1, ge=1, description="Fewest epochs (repeats of each sample) a result needs.")


class Sandbagging(PolicyModel):
    """Settings of the sandbagging checks of the elicitation report (``airlock.evals.elicitation``)."""

    alpha: float = Field(
        default=DEFAULT_ALPHA,
        gt=0,
        lt=1,
        description="Family-wise false-flag rate of a report (each comparison's interval is Bonferroni-widened).",
    )
    few_shot_min_gain: float = Field(
        default=DEFAULT_FEW_SHOT_MIN_GAIN,
        ge=0,
        le=1,
        description="The gain from demonstrations that is of concern: the gain's lower bound must clear it to flag.",
    )


class EvalRule(PolicyModel):
    """One eval that rules a threshold in or out: which results, which metric, where the lines are."""

    suite: str = Field(min_length=1, description="Suite of the results, e.g. `knowledge_proxy`.")
    task: str | None = Field(default=None, description="Task name; null: any task of the suite.")
    task_args: dict[str, Any] = Field(
        default_factory=dict, description="Only results run with these task arguments (e.g. `{domain: bio}`)."
    )
    metric: str = Field(default="mean_score", min_length=1, description="Attested metric (with a 95 % CI).")
    threshold: Finite = Field(description="Capability threshold: higher metric values mean more capability.")
    early_warning: Finite = Field(ge=0, description="Buffer below the threshold where the verdict is already unsafe.")


class Safeguard(PolicyModel):
    """A safeguard required before deployment once a threshold is crossed."""

    id: Slug = Field(description="Short id.")
    description: str = Field(min_length=1, description="What must be in place.")
    mitigation_kind: str | None = Field(
        default=None,
        description="When set, met mechanically by a `claimed` mitigation of this kind with passing robustness "
        "evidence on every deployed variant; when null, only a decider's override can vouch for it.",
    )


class Threshold(PolicyModel):
    """A capability threshold of a risk domain."""

    id: Slug = Field(description="Short id, unique within the domain.")
    description: str = Field(min_length=1, description="The capability, in words.")
    evals: list[EvalRule] = Field(min_length=1, description="The evals that rule this threshold in or out.")
    rule_out: Literal["all", "any"] = Field(
        default="all",
        description="`all`: every eval must show `below`; `any`: one `below` suffices (alternatives).",
    )
    elicitation: Elicitation
    safeguards: list[Safeguard] = Field(default_factory=list, description="Required once the threshold is crossed.")

    @model_validator(mode="after")
    def _unique_safeguards(self) -> Threshold:
        _unique([s.id for s in self.safeguards], f"safeguard ids in threshold {self.id!r}")
        return self


class Domain(PolicyModel):
    """A risk domain (bio/chem, cyber, autonomy, ML R&D, ...)."""

    id: Slug = Field(description="Short id, unique within the policy.")
    name: str = Field(min_length=1, description="Human-readable name.")
    status: Literal["tracked", "research"] = Field(
        description="`tracked` domains can block the gate; `research` domains are evaluated and reported only."
    )
    thresholds: list[Threshold] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_thresholds(self) -> Domain:
        _unique([t.id for t in self.thresholds], f"threshold ids in domain {self.id!r}")
        return self


class ClaimRule(PolicyModel):
    """The robustness eval that backs a ``claimed`` mitigation, and the bar it must clear."""

    kinds: list[str] = Field(min_length=1, description="Mitigation kinds this rule covers; `*` covers every kind.")
    suite: str = Field(min_length=1, description="Robustness suite, e.g. `refusal_robustness`.")
    task: str | None = Field(default=None, description="Task name; null: any task of the suite.")
    metric: str = Field(default="mean_score", min_length=1, description="Attested metric (higher is more robust).")
    min_value: Finite = Field(description="The bar: the metric's 95 % CI lower bound must reach it.")
    min_samples: int = Field(ge=1, description="Fewest scored samples a result needs.")


class SafetyCase(PolicyModel):
    """How mitigation stances are checked on the variants to be deployed."""

    evaluation_only_variants: list[str] = Field(
        default_factory=list,
        description="Variants never served to users (e.g. `helpful-only`): outside the safety case.",
    )
    claims: list[ClaimRule] = Field(
        default_factory=list, description="Robustness evidence per mitigation kind; first match wins."
    )


class ExternalAccess(PolicyModel):
    """Adequate time for external evaluators (EU GPAI Code of Practice, Appendix 3.4: 20 business days)."""

    min_business_days: int = Field(
        ge=1, description="Fewest business days of access each evaluator granted this version must have had."
    )
    stages: list[GatedStage] = Field(
        default_factory=lambda: list[GatedStage](["deployed"]),
        min_length=1,
        description="Gated stages this requirement applies to.",
    )
    calendar: str = Field(
        default="eu", description="Business-day calendar: `eu`, `weekends`, or a holiday file (YAML)."
    )
    min_call_business_days: int = Field(
        default=20,
        ge=1,
        description="Without any evaluator, a closed public call open this many business days that found no "
        "qualified evaluator lets the gate pass (Appendix 3.5).",
    )


class Publication(PolicyModel):
    """The publication clock (EU GPAI Code of Practice: no delay beyond 30 business days from notification)."""

    max_business_days: int = Field(
        default=30,
        ge=1,
        le=3650,
        description="A submitted report is published at the latest this many business days after its submission, "
        "unless the decider records an exceptional-circumstances extension (public, with its justification).",
    )
    max_extension_business_days: int = Field(
        default=30, ge=1, le=3650, description="Most business days one extension may add."
    )
    calendar: str = Field(
        default="eu", description="Business-day calendar: `eu`, `weekends`, or a holiday file (YAML)."
    )


class Policy(PolicyModel):
    """A lab's frontier-safety policy, as read from ``policy.yaml``."""

    version: Literal[1] = Field(description="Policy format version (1).")
    name: str = Field(min_length=1, description="Title of the policy.")
    roles: Roles = Field(default_factory=Roles)
    gate: Gate
    reevaluation: Reevaluation = Field(default_factory=Reevaluation)
    domains: list[Domain] = Field(min_length=1)
    safety_case: SafetyCase = Field(default_factory=SafetyCase)
    external_access: ExternalAccess | None = Field(
        default=None, description="Minimum business days of evaluator access before a gated stage (none: no minimum)."
    )
    publication: Publication = Field(
        default_factory=Publication, description="The publication clock of submitted reports (default 30 days)."
    )
    sandbagging: Sandbagging = Field(
        default_factory=Sandbagging, description="Settings of the elicitation report's sandbagging checks."
    )

    @model_validator(mode="after")
    def _coherent(self) -> Policy:
        _unique([d.id for d in self.domains], "domain ids")
        # Fail closed: a policy where nothing can block is an empty policy in disguise.
        if not any(d.status == "tracked" for d in self.domains):
            raise ValueError("at least one domain must be `tracked` (research domains never block)")
        return self

    def elicitation_variants(self) -> set[str]:
        """Return every variant named in any threshold's elicitation requirement."""
        return {v for d in self.domains for t in d.thresholds for v in t.elicitation.variants}

    def claim_rule(self, kind: str) -> ClaimRule | None:
        """Return the first claim rule covering mitigation ``kind``, or None."""
        for rule in self.safety_case.claims:
            if kind in rule.kinds or "*" in rule.kinds:
                return rule
        return None

    def sha256(self) -> str:
        """Return the SHA-256 of the policy's canonical JSON (what a report says it applied)."""
        return sha256_hex(self.model_dump(mode="json"))


def parse_policy(raw: Any, *, source: str = "policy") -> Policy:
    """Validate a policy given as plain data (ConfigError listing every problem otherwise)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping (version, name, gate, domains, ...)")
    try:
        return Policy.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source} is invalid: {format_validation_error(exc)}", code="invalid_policy") from None


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"policy {path} does not exist; `airlock init` writes the example policy there", code="no_policy"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"policy {path} is not valid YAML: {exc}", code="invalid_policy") from None
    return parse_policy(raw, source=str(path))
