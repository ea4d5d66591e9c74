"""The deployment gate: evaluate the policy against verified evidence, promote, override, trend.

Verdict rule (95 % CIs as attested; Wilson intervals are recomputed from the counts). For a
threshold ``T`` with early-warning buffer ``B``, one qualifying result with interval ``[lo, hi]``:

* ``crossed`` when ``lo >= T`` (the capability is established at 95 % confidence);
* ``below`` when ``hi < T - B`` (ruled out with margin, by sufficiently elicited evidence);
* ``cannot_rule_out`` otherwise: inside the buffer, the interval straddles a line, or there is
  no qualifying evidence at all.

An eval takes the verdict of its *most capable* qualifying result (maximum elicitation wins).
A report is deterministic: the same evidence, policy and clock day give byte-identical JSON,
and ``report_sha256`` covers everything except the evaluation time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from airlock.access.roles import Permission, check_permission
from airlock.businessdays import load_calendar
from airlock.canonical import sha256_hex
from airlock.db import utcnow
from airlock.errors import ConfigError, ConflictError, InvalidRequestError, NotFoundError, PermissionDeniedError
from airlock.evals.attestation import wilson_interval
from airlock.evals.elicitation import Observation, analyse, level_of, observation_of
from airlock.evals.models import EvalResult
from airlock.evals.schemas import Attestation
from airlock.evals.service import verify_stored
from airlock.governance.calls import calls_for
from airlock.governance.models import GateDecision, Override
from airlock.governance.policy import (
    ClaimRule,
    Elicitation,
    EvalRule,
    Policy,
    Sandbagging,
    Threshold,
    load_policy,
)
from airlock.ledger import service as ledger
from airlock.redteam.service import findings_against
from airlock.registry.models import Model, ModelVersion, Variant
from airlock.registry.schemas import Manifest
from airlock.registry.service import set_stage

REPORT_SCHEMA = "airlock.gate-report/v1"
Verdict = Literal["below", "cannot_rule_out", "crossed"]
_SEVERITY: dict[str, int] = {"below": 0, "cannot_rule_out": 1, "crossed": 2}
MIN_JUSTIFICATION_CHARS = 20


class GateBlockedError(ConflictError):
    """A promotion into a gated stage was refused because the gate blocks."""

    default_code = "gate_blocked"


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _round(value: float) -> float:
    # Rounded so a report is stable across platforms' float printing and easy to read.
    return round(value, 6)


def report_sha256(report: dict[str, Any]) -> str:
    """Return the SHA-256 of a report's canonical JSON, excluding its time and its own hash."""
    return sha256_hex({k: v for k, v in report.items() if k not in ("evaluated_at", "report_sha256")})


# ---------------------------------------------------------------- evidence


@dataclass(frozen=True)
class Evidence:
    """A stored result whose signature verifies now, read from its signed attestation."""

    row: EvalResult
    att: Attestation
    version_label: str
    at: datetime
    inherited: bool

    @property
    def epochs(self) -> int:
        """Return the epochs the eval ran (1 when unrecorded)."""
        try:
            return int(self.att.elicitation.get("epochs") or 1)
        except (TypeError, ValueError):
            return 1

    @property
    def fine_tuned(self) -> bool:
        """Return whether the result came from a fine-tuned model."""
        return bool(self.att.elicitation.get("fine_tuned"))

    def metric(self, name: str) -> tuple[float, float, float, int, str] | None:
        """Return ``(value, lo, hi, n, method)`` of an attested metric, or None if absent/unusable."""
        m = self.att.metrics.get(name)
        if m is None:
            return None
        lo, hi = m.ci95
        # A tolerance, since Wilson bounds at 0 and 1 carry float rounding noise.
        if not all(math.isfinite(x) for x in (m.value, lo, hi)) or not lo - 1e-9 <= m.value <= hi + 1e-9:
            return None
        if m.n <= 0 or m.n > self.att.samples * max(self.epochs, 1):
            return None  # a metric over more scores than the attested samples and epochs can give
        if 0.0 <= m.value <= 1.0:
            # Recomputed from the counts, so a mis-stated interval cannot narrow the evidence. For
            # other methods (bootstrap over scores in [0, 1]) the Wilson interval at the same n is a
            # floor on the width: a score bounded in [0, 1] varies no more than a 0/1 one.
            if m.method == "wilson":
                lo, hi = wilson_interval(round(m.value * m.n), m.n)
            else:
                wlo, whi = wilson_interval(m.value * m.n, m.n)
                lo, hi = min(lo, wlo), max(hi, whi)
        return m.value, lo, hi, m.n, m.method

    def summary(self) -> dict[str, Any]:
        """Return the result's identity and elicitation for a report."""
        return {
            "result_id": self.row.id,
            "version": self.version_label,
            "inherited": self.inherited,
            "variant": self.att.variant,
            "task": self.att.task,
            "samples": self.att.samples,
            "epochs": self.epochs,
            "fine_tuned": self.fine_tuned,
            "evaluator_id": self.row.evaluator_id,
            "at": _iso(self.at),
        }


@dataclass
class EvidencePool:
    """Every result on the relevant versions: the verified ones, and the ignored ones with why."""

    verified: list[Evidence] = field(default_factory=list)
    ignored: list[dict[str, str]] = field(default_factory=list)


def _consistency_problem(row: EvalResult, att: Attestation, model: Model, version: ModelVersion) -> str | None:
    # The signature covers the attestation, not the row's columns: a row edited in the database
    # must not be able to move a result to another variant, task or version.
    if att.model != model.name or att.version_hash != version.content_hash:
        return "the signed attestation names another model version than the stored row"
    if att.variant != row.variant or att.task != row.task or att.samples != row.samples or att.suite != row.suite:
        return "the stored row disagrees with its signed attestation"
    return None


def collect_evidence(session: Session, model: Model, version: ModelVersion, policy: Policy) -> EvidencePool:
    """Load and re-verify every result that may count for ``version`` under the policy's triggers."""
    if policy.reevaluation.new_version:
        versions = [version]
    else:
        versions = [
            v
            for v in session.scalars(select(ModelVersion).where(ModelVersion.model_id == model.id))
            if v.id == version.id or v.created_at <= version.created_at
        ]
    by_id = {v.id: v for v in versions}
    rows = session.scalars(
        select(EvalResult).where(EvalResult.version_id.in_(list(by_id))).order_by(EvalResult.created_at, EvalResult.id)
    )
    pool = EvidencePool()
    for row in rows:
        if not verify_stored(session, row):
            pool.ignored.append(
                {
                    "result_id": row.id,
                    "reason": "signature does not verify against a registered, unrevoked key of its evaluator",
                }
            )
            continue
        try:
            att = Attestation.model_validate(row.attestation)
        except ValidationError:
            pool.ignored.append({"result_id": row.id, "reason": "the signed attestation is malformed"})
            continue
        row_version = by_id[row.version_id]
        problem = _consistency_problem(row, att, model, row_version)
        if problem:
            pool.ignored.append({"result_id": row.id, "reason": problem})
            continue
        # The older of the evaluator's claim and the lab's receipt: staleness is never understated.
        at = min(att.created_at.astimezone(UTC), row.created_at)
        pool.verified.append(
            Evidence(row=row, att=att, version_label=row_version.label, at=at, inherited=row_version.id != version.id)
        )
    return pool


def _freshness_problem(ev: Evidence, version: ModelVersion, policy: Policy, now: datetime) -> str | None:
    max_age = policy.reevaluation.max_evidence_age_days
    if max_age is not None and ev.at < now - timedelta(days=max_age):
        return f"older than {max_age} days (reevaluation.max_evidence_age_days)"
    if policy.reevaluation.stage_change and ev.at < version.stage_changed_at:
        return "predates the version's last stage change (reevaluation.stage_change)"
    return None


def _elicitation_problem(ev: Evidence, req: Elicitation) -> str | None:
    if ev.att.variant not in req.variants:
        return f"variant {ev.att.variant!r} is not one the policy accepts ({', '.join(req.variants)})"
    if req.fine_tuned == "required" and not ev.fine_tuned:
        return "the policy requires fine-tuned elicitation"
    if req.fine_tuned == "forbidden" and ev.fine_tuned:
        return "the policy excludes fine-tuned results"
    if ev.att.samples < req.min_samples:
        return f"{ev.att.samples} samples < {req.min_samples} required"
    if ev.epochs < req.min_epochs:
        return f"{ev.epochs} epochs < {req.min_epochs} required"
    return None


def _matches(ev: Evidence, suite: str, task: str | None, task_args: dict[str, Any] | None = None) -> bool:
    if ev.att.suite != suite or (task is not None and ev.att.task != task):
        return False
    if task_args:
        recorded = ev.att.elicitation.get("task_args") or {}
        if not isinstance(recorded, dict) or any(recorded.get(k) != v for k, v in task_args.items()):
            return False
    return True


# ---------------------------------------------------------------- verdicts


def classify(lo: float, hi: float, value: float, threshold: float, early_warning: float) -> tuple[Verdict, str]:
    """Return the verdict of one interval against a threshold and its early-warning buffer."""
    line = threshold - early_warning
    if lo >= threshold:
        return "crossed", f"CI lower bound {lo:.3f} >= threshold {threshold:g}"
    if hi < line:
        return "below", f"CI upper bound {hi:.3f} < early-warning line {line:g}"
    if value >= threshold:
        return "cannot_rule_out", f"estimate {value:.3f} at/above threshold, CI lower bound {lo:.3f} below it"
    if value >= line:
        return "cannot_rule_out", f"estimate {value:.3f} inside the early-warning buffer [{line:g}, {threshold:g})"
    return "cannot_rule_out", f"CI upper bound {hi:.3f} reaches the early-warning line {line:g}"


def _worst(verdicts: list[Verdict]) -> Verdict:
    return max(verdicts, key=lambda v: _SEVERITY[v])


def _evaluate_eval(
    rule: EvalRule, req: Elicitation, pool: EvidencePool, version: ModelVersion, policy: Policy, now: datetime
) -> dict[str, Any]:
    evidence: list[dict[str, Any]] = []
    excluded: list[dict[str, str]] = []
    verdicts: list[Verdict] = []
    for ev in pool.verified:
        if not _matches(ev, rule.suite, rule.task, rule.task_args):
            continue
        metric = ev.metric(rule.metric)
        problem = (
            (None if metric else f"no usable metric {rule.metric!r} with a 95 % CI")
            or _elicitation_problem(ev, req)
            or _freshness_problem(ev, version, policy, now)
        )
        if problem or metric is None:
            excluded.append({"result_id": ev.row.id, "reason": problem or "unusable metric"})
            continue
        value, lo, hi, n, method = metric
        verdict, reason = classify(lo, hi, value, rule.threshold, rule.early_warning)
        if verdict == "below" and level_of(ev.row.attestation) == "noise-injected":
            # Noise degrades an honest model: a noised score can show a capability, never rule one out.
            excluded.append({"result_id": ev.row.id, "reason": "a noise-injected result cannot rule a threshold out"})
            continue
        verdicts.append(verdict)
        evidence.append(
            {
                **ev.summary(),
                "value": _round(value),
                "ci95": [_round(lo), _round(hi)],
                "n": n,
                "method": method,
                "verdict": verdict,
                "reason": reason,
            }
        )
    if verdicts:
        verdict = _worst(verdicts)
        reason = next(e["reason"] for e in evidence if e["verdict"] == verdict)
    else:
        verdict = "cannot_rule_out"
        reason = "no qualifying evidence" + (f" ({len(excluded)} result(s) excluded)" if excluded else "")
    flags = _elicitation_flags(rule, pool, version, policy, now)
    if flags and verdict != "crossed":
        # A sign of sandbagging or of incomplete elicitation: the best score is no upper bound.
        verdict = "cannot_rule_out"
        reason = f"elicitation flag ({flags[0]['check']}): {flags[0]['reason']}"
    return {
        "suite": rule.suite,
        "task": rule.task,
        "task_args": rule.task_args,
        "metric": rule.metric,
        "threshold": rule.threshold,
        "early_warning": rule.early_warning,
        "early_warning_line": _round(rule.threshold - rule.early_warning),
        "verdict": verdict,
        "reason": reason,
        "evidence": evidence,
        "excluded": excluded,
        "elicitation_flags": flags,
    }


def _elicitation_flags(
    rule: EvalRule, pool: EvidencePool, version: ModelVersion, policy: Policy, now: datetime
) -> list[dict[str, Any]]:
    """Run the sandbagging checks over every fresh result of the rule's eval, at any elicitation level."""
    observations: list[Observation] = []
    for ev in pool.verified:
        if not _matches(ev, rule.suite, rule.task, rule.task_args) or _freshness_problem(ev, version, policy, now):
            continue
        obs, _why = observation_of(ev.row.id, ev.row.attestation, rule.metric)
        if obs is not None:
            observations.append(obs)
    checks = policy.sandbagging
    flags: list[dict[str, Any]] = analyse(observations, alpha=checks.alpha, few_shot_min_gain=checks.few_shot_min_gain)[
        "flags"
    ]
    return flags


def _threshold_verdict(threshold: Threshold, evals: list[dict[str, Any]]) -> Verdict:
    verdicts: list[Verdict] = [e["verdict"] for e in evals]
    if "crossed" in verdicts:
        return "crossed"
    if threshold.rule_out == "all":
        return "below" if all(v == "below" for v in verdicts) else "cannot_rule_out"
    return "below" if "below" in verdicts else "cannot_rule_out"


def _safety_case(version: ModelVersion, pool: EvidencePool, policy: Policy, now: datetime) -> list[dict[str, Any]]:
    """Check every mitigation of every variant to be deployed: a stance, and evidence for claims."""
    entries: list[dict[str, Any]] = []
    elicitation_variants = policy.elicitation_variants()
    deployed = [v for v in version.variants if v.name not in policy.safety_case.evaluation_only_variants]
    for variant in sorted(deployed, key=lambda v: v.name):
        for m in variant.mitigations:
            entry: dict[str, Any] = {"variant": variant.name, "mitigation": m.name, "kind": m.kind, "stance": m.stance}
            if m.stance == "disabled_for_eval":
                without = sorted(
                    v.name
                    for v in version.variants
                    if v.name in elicitation_variants and all(x.name != m.name for x in v.mitigations)
                )
                if without:
                    entry |= {"status": "ok", "reason": f"evaluators had {', '.join(without)} without it"}
                else:
                    entry |= {
                        "status": "unsupported",
                        "reason": "no variant the policy elicits capabilities on is served without it",
                    }
            elif m.stance == "claimed":
                entry |= _claim_status(variant, m.name, policy.claim_rule(m.kind), pool, version, policy, now)
            else:
                entry |= {"status": "no_stance", "reason": "neither disabled_for_eval nor claimed"}
            entry["blocks"] = entry["status"] != "ok"
            entries.append(entry)
    return entries


def _claim_status(
    variant: Variant,
    mitigation: str,
    rule: ClaimRule | None,
    pool: EvidencePool,
    version: ModelVersion,
    policy: Policy,
    now: datetime,
) -> dict[str, Any]:
    if rule is None:
        return {
            "status": "no_claim_rule",
            "reason": "the policy names no robustness eval for this kind",
            "evidence": [],
        }
    evidence: list[dict[str, Any]] = []
    excluded: list[dict[str, str]] = []
    for ev in pool.verified:
        if ev.att.variant != variant.name or not _matches(ev, rule.suite, rule.task):
            continue
        metric = ev.metric(rule.metric)
        recorded = {str(x.get("name")) for x in ev.att.mitigations}
        problem = (
            (None if metric else f"no usable metric {rule.metric!r} with a 95 % CI")
            or (None if mitigation in recorded else "the attestation does not record this mitigation as active")
            or (None if ev.att.samples >= rule.min_samples else f"{ev.att.samples} samples < {rule.min_samples}")
            or _freshness_problem(ev, version, policy, now)
        )
        if problem or metric is None:
            excluded.append({"result_id": ev.row.id, "reason": problem or "unusable metric"})
            continue
        value, lo, hi, n, method = metric
        evidence.append(
            {
                **ev.summary(),
                "value": _round(value),
                "ci95": [_round(lo), _round(hi)],
                "n": n,
                "method": method,
                "passes": lo >= rule.min_value,
            }
        )
    base = {"eval": {"suite": rule.suite, "task": rule.task, "metric": rule.metric, "min_value": rule.min_value}}
    if not evidence:
        reason = "no qualifying robustness evidence" + (f" ({len(excluded)} excluded)" if excluded else "")
        return base | {"status": "no_evidence", "reason": reason, "evidence": [], "excluded": excluded}
    # Every qualifying result must clear the bar: re-running until one passes must not help.
    failing = [e for e in evidence if not e["passes"]]
    if failing:
        worst = min(failing, key=lambda e: e["ci95"][0])
        reason = f"CI lower bound {worst['ci95'][0]:.3f} < bar {rule.min_value:g} ({worst['result_id']})"
        return base | {"status": "unsupported", "reason": reason, "evidence": evidence, "excluded": excluded}
    lowest = min(e["ci95"][0] for e in evidence)
    reason = f"CI lower bound {lowest:.3f} >= bar {rule.min_value:g}"
    return base | {"status": "ok", "reason": reason, "evidence": evidence, "excluded": excluded}


def _contest_claims(session: Session, version: ModelVersion, safety_case: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Count open high/critical red-team findings against the claimed mitigations of their variant.

    Each such finding (see :func:`airlock.redteam.service.findings_against`) turns every claimed
    mitigation of its variant into a blocking entry naming the finding, until the finding is fixed
    in a later version, disputed with a reason, or the block is overridden.
    """
    findings = findings_against(session, version)
    by_variant: dict[str, list[str]] = {}
    for f in findings:
        by_variant.setdefault(f.variant, []).append(f.id)
    for entry in safety_case:
        ids = by_variant.get(entry["variant"])
        if entry["stance"] != "claimed" or not ids:
            continue
        entry["redteam_findings"] = ids
        contest = f"contested by red-team finding(s) {', '.join(ids)}"
        if entry["status"] == "ok":
            entry |= {"status": "contested", "reason": contest}
        else:
            entry["reason"] = f"{entry['reason']}; {contest}"
        entry["blocks"] = True
    return [
        {
            "finding_id": f.id,
            "variant": f.variant,
            "category": f.category,
            "severity": f.severity,
            "status": f.status,
            "counts_against_claims": f.variant in {e["variant"] for e in safety_case if e["stance"] == "claimed"},
        }
        for f in findings
    ]


def _safeguards(threshold: Threshold, safety_case: list[dict[str, Any]], deployed: set[str]) -> list[dict[str, Any]]:
    out = []
    for sg in threshold.safeguards:
        if sg.mitigation_kind is None:
            met, how = False, "needs a decider's confirmation (override)"
        else:
            covered = {
                e["variant"]
                for e in safety_case
                if e["kind"] == sg.mitigation_kind and e["stance"] == "claimed" and e["status"] == "ok"
            }
            met = bool(deployed) and deployed <= covered
            missing = sorted(deployed - covered)
            how = "met by evidence-backed claimed mitigations" if met else f"missing on {', '.join(missing) or '-'}"
        out.append(
            {
                "id": sg.id,
                "description": sg.description,
                "mitigation_kind": sg.mitigation_kind,
                "met": met,
                "reason": how,
            }
        )
    return out


def _when(value: str) -> datetime:
    """Parse a ledger time (UTC ISO-8601, ``Z`` or an offset)."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def external_access(
    session: Session, model: Model, version: ModelVersion, policy: Policy, stage: str, now: datetime
) -> dict[str, Any] | None:
    """Count each evaluator's business days of access to ``version`` from the ledger's grant entries.

    Per evaluator: the longest access among their grants (start: issue or ``not_before``; end: now,
    ``not_after`` or revocation), with the count for each granted variant and scope.
    """
    rule = policy.external_access
    if rule is None or stage not in rule.stages:
        return None
    try:
        calendar = load_calendar(rule.calendar)
    except ValueError as exc:
        raise ConfigError(f"policy external_access.calendar: {exc}", code="invalid_policy") from None
    events = ledger.logged_events(session, ["grant.issued", "grant.revoked"])
    revoked = {
        e.body.get("grant"): _when(e.body.get("revoked_at") or e.time) for e in events if e.kind == "grant.revoked"
    }
    evaluators: dict[str, dict[str, Any]] = {}
    for e in events:
        body = e.body
        if e.kind != "grant.issued" or body.get("model") != model.name:
            continue
        if not any(v.get("hash") == version.content_hash for v in body.get("versions", [])):
            continue
        start = _when(e.time)
        if body.get("not_before"):
            start = max(start, _when(str(body["not_before"])))
        ends = [now] + ([_when(str(body["not_after"]))] if body.get("not_after") else [])
        if body.get("grant") in revoked:
            ends.append(revoked[body["grant"]])
        days = calendar.business_days(start, min(ends))
        row = evaluators.setdefault(
            str(body.get("evaluator")), {"evaluator": body.get("evaluator"), "business_days": 0, "by_access": {}}
        )
        row["business_days"] = max(row["business_days"], days)
        for variant in body.get("variants", []):
            for scope in body.get("scopes", []):
                key = f"{variant}/{scope}"
                row["by_access"][key] = max(row["by_access"].get(key, 0), days)
    rows = sorted(evaluators.values(), key=lambda r: r["evaluator"])
    blocking = [
        f"external access: {r['evaluator']} had {r['business_days']} business day(s) of access, "
        f"fewer than {rule.min_business_days} (external_access.min_business_days)"
        for r in rows
        if r["business_days"] < rule.min_business_days
    ]
    unanswered: list[dict[str, Any]] = []
    if not rows:
        # Appendix 3.5: no external evaluation is needed only when a public call, open long enough, found none.
        for call in calls_for(session, version.content_hash):
            if call.closed_at is None or call.qualified:
                continue
            open_days = calendar.business_days(call.opened_at, call.closed_at)
            if open_days >= rule.min_call_business_days:
                unanswered.append({"call": call.id, "business_days_open": open_days, "applications": call.applications})
        if not unanswered:
            blocking.append(
                "external access: no external evaluator was granted access to this version, and no closed public "
                f"call open {rule.min_call_business_days} business days found none qualified"
            )
    return {
        "min_business_days": rule.min_business_days,
        "calendar": calendar.name,
        "evaluators": rows,
        "unanswered_calls": unanswered,
        "blocking": blocking,
    }


def evaluate_gate(
    session: Session, model: Model, version: ModelVersion, stage: str, policy: Policy, *, now: datetime | None = None
) -> dict[str, Any]:
    """Evaluate ``policy`` for moving ``version`` to ``stage`` and return the gate report."""
    now = now or utcnow()
    pool = collect_evidence(session, model, version, policy)
    safety_case = _safety_case(version, pool, policy, now)
    redteam = _contest_claims(session, version, safety_case)
    deployed = {v.name for v in version.variants if v.name not in policy.safety_case.evaluation_only_variants}
    domains: list[dict[str, Any]] = []
    blocking: list[str] = []
    for domain in policy.domains:
        thresholds: list[dict[str, Any]] = []
        for threshold in domain.thresholds:
            evals = [_evaluate_eval(r, threshold.elicitation, pool, version, policy, now) for r in threshold.evals]
            verdict = _threshold_verdict(threshold, evals)
            safeguards = _safeguards(threshold, safety_case, deployed) if verdict == "crossed" else []
            thresholds.append(
                {
                    "id": threshold.id,
                    "description": threshold.description,
                    "verdict": verdict,
                    "rule_out": threshold.rule_out,
                    "elicitation": threshold.elicitation.model_dump(mode="json"),
                    "evals": evals,
                    "required_safeguards": safeguards,
                }
            )
        verdict = _worst([t["verdict"] for t in thresholds])
        unmet = [f"{t['id']}/{s['id']}" for t in thresholds for s in t["required_safeguards"] if not s["met"]]
        blocks = domain.status == "tracked" and (verdict == "cannot_rule_out" or (verdict == "crossed" and bool(unmet)))
        if blocks:
            if verdict == "crossed":
                detail = f"safeguards not met: {', '.join(unmet)}"
            else:
                detail = "; ".join(
                    f"{t['id']}: {e['reason']}" for t in thresholds for e in t["evals"] if e["verdict"] == verdict
                )
            blocking.append(f"domain {domain.id}: {verdict} ({detail})")
        domains.append(
            {
                "id": domain.id,
                "name": domain.name,
                "status": domain.status,
                "verdict": verdict,
                "blocks": blocks,
                "unmet_safeguards": unmet,
                "thresholds": thresholds,
            }
        )
    access = external_access(session, model, version, policy, stage, now)
    if access is not None:
        blocking += access["blocking"]
    for entry in safety_case:
        if entry["blocks"]:
            blocking.append(
                f"mitigation {entry['variant']}/{entry['mitigation']}: {entry['status']} ({entry['reason']})"
            )
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "model": model.name,
        "version": version.label,
        "version_hash": version.content_hash,
        "current_stage": version.stage,
        "target_stage": stage,
        "gate_required": stage in policy.gate.stages,
        "policy": {"name": policy.name, "sha256": policy.sha256()},
        "decision": "block" if blocking else "allow",
        "blocking": blocking,
        "domains": domains,
        "safety_case": safety_case,
        "redteam_findings": redteam,
        "ignored_results": pool.ignored,
        "external_access": access,
        "evidence_result_ids": sorted(
            {e["result_id"] for d in domains for t in d["thresholds"] for ev in t["evals"] for e in ev["evidence"]}
            | {e["result_id"] for s in safety_case for e in s.get("evidence", [])}
        ),
        "evaluated_at": _iso(now),
    }
    report["report_sha256"] = report_sha256(report)
    return report


# ---------------------------------------------------------------- promotion and overrides


@dataclass(frozen=True)
class OverrideRequest:
    """A decider's request to promote despite a blocking gate."""

    decider: str
    role: str
    justification: str
    token_id: str | None = None


@dataclass
class Promotion:
    """The outcome of a promotion attempt (commit the session, then check ``promoted``)."""

    version: ModelVersion
    stage: str
    promoted: bool
    decision: GateDecision | None = None
    override: Override | None = None
    message: str = ""

    def raise_if_refused(self) -> None:
        """Raise GateBlockedError when the promotion was refused."""
        if not self.promoted:
            raise GateBlockedError(self.message)


def promote(
    session: Session,
    version: ModelVersion,
    stage: str,
    *,
    actor: str,
    policy: Policy | None,
    policy_path: Path | None = None,
    override: OverrideRequest | None = None,
    now: datetime | None = None,
) -> Promotion:
    """Move ``version`` to ``stage``, through the gate when the policy gates that stage.

    The gate decision is added to the session whether or not the version moves: the caller
    commits, then calls :meth:`Promotion.raise_if_refused`, so refused attempts stay on record.
    """
    model = session.get(Model, version.model_id)
    assert model is not None
    if version.stage == stage:
        return Promotion(version, stage, promoted=True, message=f"{model.name}@{version.label} is already {stage}")
    if policy is None:
        # Fail closed: without a policy nothing can vouch for a deployment.
        if stage == "deployed":
            where = f" at {policy_path}" if policy_path else ""
            raise ConflictError(
                f"no policy{where}: a version cannot be deployed without one (`airlock init` writes an example)",
                code="no_policy",
            )
        set_stage(session, version, stage, actor=actor)
        return Promotion(version, stage, promoted=True, message=f"{model.name}@{version.label} -> {stage} (ungated)")
    if stage not in policy.gate.stages:
        set_stage(session, version, stage, actor=actor)
        return Promotion(version, stage, promoted=True, message=f"{model.name}@{version.label} -> {stage} (ungated)")
    if override is not None:
        _check_override(override, policy)
    report = evaluate_gate(session, model, version, stage, policy, now=now)
    decision = GateDecision(
        model_id=model.id,
        version_id=version.id,
        from_stage=version.stage,
        stage=stage,
        decision=report["decision"],
        actor=actor,
        report_sha256=report["report_sha256"],
        policy_sha256=report["policy"]["sha256"],
        report=report,
    )
    session.add(decision)
    session.flush()
    ledger.record_event(session, "gate.decision", _decision_event(decision, report))
    where = f"{model.name}@{version.label}"
    if report["decision"] == "allow":
        decision.promoted = True
        set_stage(session, version, stage, actor=actor)
        return Promotion(version, stage, promoted=True, decision=decision, message=f"{where} -> {stage}: gate allows")
    if override is None:
        message = f"the gate blocks {where} -> {stage} ({decision.id}): " + "; ".join(report["blocking"])
        return Promotion(version, stage, promoted=False, decision=decision, message=message)
    row = Override(
        decision_id=decision.id,
        version_id=version.id,
        stage=stage,
        decider=override.decider,
        decider_role=override.role,
        decider_token_id=override.token_id,
        justification=override.justification.strip(),
        blocking=list(report["blocking"]),
    )
    session.add(row)
    session.flush()
    ledger.record_event(
        session,
        "gate.override",
        {
            "override_id": row.id,
            "decision_id": decision.id,
            "model": model.name,
            "version": version.label,
            "version_hash": version.content_hash,
            "stage": stage,
            "decider": row.decider,
            "role": row.decider_role,
            "justification": row.justification,
            "blocking": row.blocking,
            # The red-team findings this override sets aside, by id (their content stays committed).
            "redteam_finding_ids": sorted(
                {f for e in report["safety_case"] if e["blocks"] for f in e.get("redteam_findings", [])}
            ),
            "report_sha256": decision.report_sha256,
        },
    )
    decision.promoted = True
    set_stage(session, version, stage, actor=f"{override.decider} (override {row.id})")
    message = f"{where} -> {stage}: the gate blocks; overridden by {override.decider} ({row.id})"
    return Promotion(version, stage, promoted=True, decision=decision, override=row, message=message)


def sandbagging_settings(policy: Policy | None) -> Sandbagging:
    """Return the sandbagging checks' settings of ``policy`` (the defaults without a policy)."""
    return policy.sandbagging if policy is not None else Sandbagging()


def active_policy(path: Path) -> Policy | None:
    """Return the policy at ``path``; None when there is no file (an invalid file is an error)."""
    if not path.exists():
        return None
    return load_policy(path)


def policy_for_request(path: Path) -> Policy | None:
    """Like :func:`active_policy`, but an invalid policy file is a 409 for API callers, not a 500."""
    try:
        return active_policy(path)
    except ConfigError as exc:
        raise ConflictError(f"the gate is unavailable: {exc.message}", code="gate_unavailable") from None


def promote_as(
    session: Session,
    version: ModelVersion,
    stage: str,
    *,
    name: str,
    role: str,
    policy_path: Path,
    token_id: str | None = None,
    justification: str | None = None,
) -> Promotion:
    """Promote on behalf of an authenticated lab principal; a justification makes it an override."""
    check_permission(role, Permission.STAGE_CHANGE)
    policy = policy_for_request(policy_path)
    override = (
        OverrideRequest(decider=name, role=role, justification=justification, token_id=token_id)
        if justification is not None
        else None
    )
    return promote(session, version, stage, actor=name, policy=policy, policy_path=policy_path, override=override)


def refuse_gated_manifest_stages(session: Session, manifest: Manifest, policy_path: Path) -> None:
    """Refuse a manifest that would move (or register) a version into a gated stage without the gate."""
    policy = policy_for_request(policy_path)
    gated = set(policy.gate.stages) if policy else {"deployed"}
    problems = []
    for model_spec in manifest.models:
        model = session.scalar(select(Model).where(Model.name == model_spec.name))
        for spec in model_spec.versions:
            current = None
            if model is not None and spec.label:
                current = session.scalar(
                    select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.label == spec.label)
                )
            if spec.stage in gated and (current is None or current.stage != spec.stage):
                problems.append(f"{model_spec.name}@{spec.label or '(new)'} -> {spec.stage}")
    if problems:
        raise ConflictError(
            "a manifest cannot move versions into gated stages (" + ", ".join(problems) + "); "
            "use POST /v1/airlock/gate/models/{model}/versions/{label}/promote so the gate is evaluated",
            code="gated_stage",
        )


def _check_override(override: OverrideRequest, policy: Policy) -> None:
    # The role matrix says who may move stages at all; the policy names which of them decides.
    check_permission(override.role, Permission.STAGE_CHANGE)
    if override.role != policy.roles.decides:
        raise PermissionDeniedError(
            f"only the policy's decider role ({policy.roles.decides!r}) may override the gate; "
            f"{override.decider!r} has role {override.role!r}",
            code="not_decider",
        )
    if len(override.justification.strip()) < MIN_JUSTIFICATION_CHARS:
        raise InvalidRequestError(
            f"an override needs a written justification of at least {MIN_JUSTIFICATION_CHARS} characters",
            code="justification_required",
            param="justification",
        )


def _decision_event(decision: GateDecision, report: dict[str, Any]) -> dict[str, Any]:
    return {
        "decision_id": decision.id,
        "model": report["model"],
        "version": report["version"],
        "version_hash": report["version_hash"],
        "from_stage": decision.from_stage,
        "stage": decision.stage,
        "decision": report["decision"],
        "domains": {d["id"]: d["verdict"] for d in report["domains"]},
        "blocking": report["blocking"],
        "evidence_result_ids": report["evidence_result_ids"],
        "ignored_result_ids": [r["result_id"] for r in report["ignored_results"]],
        "policy_sha256": report["policy"]["sha256"],
        "report_sha256": report["report_sha256"],
    }


def history(session: Session, version: ModelVersion) -> list[tuple[GateDecision, Override | None]]:
    """Return the version's gate decisions, oldest first, each with its override if any."""
    decisions = list(
        session.scalars(
            select(GateDecision)
            .where(GateDecision.version_id == version.id)
            .order_by(GateDecision.created_at, GateDecision.id)
        )
    )
    overrides = {o.decision_id: o for o in session.scalars(select(Override).where(Override.version_id == version.id))}
    return [(d, overrides.get(d.id)) for d in decisions]


def get_decision(session: Session, decision_id: str) -> GateDecision:
    """Return a gate decision by id or raise NotFoundError."""
    row = session.get(GateDecision, decision_id)
    if row is None:
        raise NotFoundError(f"gate decision {decision_id!r} does not exist")
    return row


# ---------------------------------------------------------------- trend across checkpoints


def trend(session: Session, model: Model, policy: Policy) -> dict[str, Any]:
    """Return each domain's metric across the model's versions, with thresholds and a naive extrapolation.

    Each version is judged on its own evidence (elicitation rules apply, evidence age does not:
    this is history). The extrapolation is a least-squares line over checkpoint index, labelled
    as such: a warning light, not a forecast.
    """
    versions = list(
        session.scalars(
            select(ModelVersion)
            .where(ModelVersion.model_id == model.id)
            .options(selectinload(ModelVersion.variants))
            .order_by(ModelVersion.created_at, ModelVersion.id)
        )
    )
    # One point per version from its own evidence; age triggers do not apply to history.
    history_rules = {"new_version": True, "stage_change": False, "max_evidence_age_days": None}
    per_version_policy = policy.model_copy(
        update={"reevaluation": policy.reevaluation.model_copy(update=history_rules)}
    )
    now = utcnow()
    pools = {v.id: collect_evidence(session, model, v, per_version_policy) for v in versions}
    series = []
    for domain in policy.domains:
        for threshold in domain.thresholds:
            for rule in threshold.evals:
                points = []
                for v in versions:
                    result = _evaluate_eval(rule, threshold.elicitation, pools[v.id], v, per_version_policy, now)
                    top = max(result["evidence"], key=lambda e: e["value"], default=None)
                    points.append(
                        {
                            "version": v.label,
                            "stage": v.stage,
                            "value": top["value"] if top else None,
                            "ci95": top["ci95"] if top else None,
                            "result_id": top["result_id"] if top else None,
                            "verdict": result["verdict"],
                        }
                    )
                series.append(
                    {
                        "domain": domain.id,
                        "domain_status": domain.status,
                        "threshold_id": threshold.id,
                        "suite": rule.suite,
                        "task": rule.task,
                        "metric": rule.metric,
                        "threshold": rule.threshold,
                        "early_warning_line": _round(rule.threshold - rule.early_warning),
                        "points": points,
                        "extrapolation": _extrapolate(points, rule),
                    }
                )
    return {"model": model.name, "policy": {"name": policy.name, "sha256": policy.sha256()}, "series": series}


def _extrapolate(points: list[dict[str, Any]], rule: EvalRule) -> dict[str, Any] | None:
    known = [(i, p["value"]) for i, p in enumerate(points) if p["value"] is not None]
    if len(known) < 2:
        return None
    xs = [float(i) for i, _ in known]
    ys = [float(y) for _, y in known]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    next_x = float(len(points))
    predicted = my + slope * (next_x - mx)
    line = rule.threshold - rule.early_warning
    warn = predicted >= line and ys[-1] < line
    return {
        "method": "least-squares line over checkpoint index (simple extrapolation, not a forecast)",
        "slope_per_checkpoint": _round(slope),
        "predicted_next": _round(predicted),
        "warning": (
            f"the simple linear extrapolation reaches the early-warning line {line:g} at the next checkpoint"
            if warn
            else None
        ),
    }


def plot_trend(data: dict[str, Any], out: Path) -> Path:
    """Draw each series across versions with 95 % CIs, threshold and early-warning lines, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = data["series"]
    fig, axes = plt.subplots(len(series) or 1, 1, figsize=(8, 2.6 * max(1, len(series))), squeeze=False)
    for ax, s in zip(axes[:, 0], series, strict=False):
        labels = [p["version"] for p in s["points"]]
        xs = list(range(len(labels)))
        known = [(x, p) for x, p in zip(xs, s["points"], strict=True) if p["value"] is not None]
        if known:
            ax.errorbar(
                [x for x, _ in known],
                [p["value"] for _, p in known],
                yerr=[
                    [p["value"] - p["ci95"][0] for _, p in known],
                    [p["ci95"][1] - p["value"] for _, p in known],
                ],
                fmt="o-",
                capsize=3,
                color="tab:blue",
                label=f"{s['suite']}:{s['metric']} (95% CI)",
            )
        ax.axhline(s["threshold"], color="tab:red", lw=1.2, label="threshold")
        ax.axhline(s["early_warning_line"], color="tab:orange", lw=1.2, ls="--", label="early warning")
        extrapolation = s["extrapolation"]
        if extrapolation and known:
            last_x, last = known[-1]
            ax.plot(
                [last_x, len(labels)],
                [last["value"], extrapolation["predicted_next"]],
                ls=":",
                color="grey",
                label="simple extrapolation",
            )
            labels = [*labels, "next (extrapolated)"]
        ax.set_xticks(range(len(labels)), labels, fontsize="small")
        ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_title(f"{s['domain']} / {s['threshold_id']}", fontsize="medium")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="x-small", loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
