"""The Model Report's external-evaluation section, derived from ledger entries and checked offline.

Every statement is a pure function of the ledger entries it cites (:func:`derive`), so the
generator and the verifier run the same code: the report ships each cited entry with an RFC 9162
inclusion proof against one signed (and, with witnesses, cosigned) checkpoint, and
``airlock-verify --model-report FILE`` re-derives every statement from the proven entries and the
embedded calendar. Any edited number, date or name fails the comparison; an edited entry fails its
inclusion proof. The samples shown per evaluation are chosen by SHA-256 of the checkpoint root
and the result id, so the lab cannot pick them after the checkpoint is witnessed.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from airlock.businessdays import Calendar
from airlock.ledger._cosig import WitnessVerifier, cosignatures
from airlock.ledger._entry import iso_utc, parse_time
from airlock.ledger._merkle import ProofError, leaf_hash, verify_inclusion
from airlock.ledger._note import NoteError, Verifier, verify_checkpoint

__all__ = [
    "FORMAT",
    "SAMPLES_PER_EVALUATION",
    "derive",
    "is_relevant",
    "render_markdown",
    "sample_indices",
    "verify_model_report",
]

FORMAT = "airlock.model-report/v1"
SAMPLES_PER_EVALUATION = 5
_SAMPLE_DOMAIN = b"airlock.model-report/samples/v1\n"
KINDS = (
    "grant.issued",
    "grant.revoked",
    "stage.changed",
    "eval.attested",
    "gate.decision",
    "gate.override",
    "redteam.finding",
    "redteam.triage",
    "report.published",
    "report.extended",
)
SEVERITIES = ("critical", "high", "medium", "low")
SCOPES_SHOWN = ("sampling", "logprobs", "finetune", "interp", "redteam")


def _version_hash(body: Mapping[str, Any]) -> str | None:
    version = body.get("version")
    if isinstance(version, dict):
        return str(version.get("hash", "")) or None
    return str(body.get("version_hash", "")) or None


def is_relevant(entry: Mapping[str, Any], model: str, version_hash: str, grants: set[str]) -> bool:
    """Return whether an entry speaks about this version (grants: ids of its ``grant.issued`` entries so far)."""
    kind, body = entry.get("kind"), entry.get("body") or {}
    if kind == "grant.issued":
        return body.get("model") == model and any(v.get("hash") == version_hash for v in body.get("versions", []))
    if kind == "grant.revoked":
        return body.get("grant") in grants
    if kind in (
        "stage.changed",
        "eval.attested",
        "gate.decision",
        "gate.override",
        "redteam.finding",
        "redteam.triage",
        "report.published",
        "report.extended",
    ):
        return _version_hash(body) == version_hash
    return False


def sample_indices(root: bytes, result_id: str, n: int, k: int = SAMPLES_PER_EVALUATION) -> list[int]:
    """Return ``min(k, n)`` distinct sample indices in ``[0, n)`` drawn from SHA-256(domain, root, result id)."""
    seed = hashlib.sha256(_SAMPLE_DOMAIN + root + result_id.encode()).digest()
    chosen: list[int] = []
    counter = 0
    while len(chosen) < min(k, n):
        value = int.from_bytes(hashlib.sha256(seed + counter.to_bytes(8, "big")).digest(), "big")
        counter += 1
        # Rejection sampling keeps every index equally likely.
        limit = (1 << 256) - (1 << 256) % n
        if value >= limit:
            continue
        index = value % n
        if index not in chosen:
            chosen.append(index)
    return sorted(chosen)


def _access_window(
    entry: Mapping[str, Any], revoked: Mapping[str, tuple[int, datetime]]
) -> tuple[datetime, datetime | None]:
    body = entry["body"]
    issued = parse_time(entry["time"])
    start = max(issued, parse_time(body["not_before"])) if body.get("not_before") else issued
    ends = [parse_time(body["not_after"])] if body.get("not_after") else []
    if body["grant"] in revoked:
        ends.append(revoked[body["grant"]][1])
    return start, (min(ends) if ends else None)


def derive(
    entries: Mapping[int, Mapping[str, Any]], version_hash: str, calendar: Calendar, root: bytes
) -> list[dict[str, Any]]:
    """Derive every statement of the section from the cited entries (index → parsed entry)."""
    ordered = sorted(entries.items())
    stages = [(i, e) for i, e in ordered if e["kind"] == "stage.changed"]
    revoked: dict[str, tuple[int, datetime]] = {}
    for i, e in ordered:
        if e["kind"] == "grant.revoked":
            revoked[e["body"]["grant"]] = (i, parse_time(e["body"].get("revoked_at") or e["time"]))
    results_by_grant: dict[str, list[str]] = {}
    statements: list[dict[str, Any]] = []
    for i, e in ordered:
        body = e["body"]
        if e["kind"] == "grant.issued":
            start, until = _access_window(e, revoked)
            before = []
            for si, s in stages:
                at = parse_time(s["time"])
                end = min(at, until) if until else at
                before.append(
                    {
                        "stage": s["body"].get("to"),
                        "at": iso_utc(at),
                        "index": si,
                        "business_days": calendar.business_days(start, end) if at > start else 0,
                    }
                )
            commitments = e.get("commitments") or {}
            cites = (
                [i] + ([revoked[body["grant"]][0]] if body["grant"] in revoked else []) + [b["index"] for b in before]
            )
            statements.append(
                {
                    "kind": "access",
                    "cites": cites,
                    "evaluator": body.get("evaluator"),
                    "grant": body.get("grant"),
                    "scopes": sorted(body.get("scopes", [])),
                    "variants": sorted(body.get("variants", [])),
                    "from": iso_utc(start),
                    "until": iso_utc(until) if until else None,
                    "embargo_days": body.get("embargo_days"),
                    "quotas_commitment": commitments.get("quotas"),
                    "terms_commitment": commitments.get("terms"),
                    "business_days_before_stage_changes": before,
                }
            )
        elif e["kind"] == "stage.changed":
            statements.append(
                {
                    "kind": "stage",
                    "cites": [i],
                    "from": body.get("from"),
                    "to": body.get("to"),
                    "at": e["time"],
                }
            )
        elif e["kind"] == "eval.attested":
            result_id = str(body.get("result"))
            results_by_grant.setdefault(str(body.get("grant")), []).append(result_id)
            samples = int(body.get("samples") or 0)
            statements.append(
                {
                    "kind": "result",
                    "cites": [i],
                    "result": result_id,
                    "evaluator": body.get("evaluator"),
                    "grant": body.get("grant"),
                    "variant": body.get("variant"),
                    "suite": body.get("suite"),
                    "task": body.get("task"),
                    "samples": samples,
                    "elicitation": {"fine_tuned": bool(body.get("fine_tuned"))},
                    "metrics": body.get("metrics") if not body.get("embargoed") else None,
                    "metrics_commitment": (e.get("commitments") or {}).get("metrics"),
                    "at": e["time"],
                    "log_sha256": body.get("log_sha256"),
                    "sample_selection": {
                        "method": "sha256(domain || checkpoint root || result id), rejection-sampled",
                        "indices": sample_indices(root, result_id, samples),
                        # The evaluator keeps the samples; the log digest commits to them.
                        "shown_as": "commitment",
                        "commitment": body.get("log_sha256"),
                    },
                }
            )
        elif e["kind"] == "gate.decision":
            evidence = list(body.get("evidence_result_ids", []))
            external = sorted({r for rs in results_by_grant.values() for r in rs} & set(evidence))
            statements.append(
                {
                    "kind": "gate",
                    "cites": [i],
                    "decision_id": body.get("decision_id"),
                    "from": body.get("from_stage"),
                    "stage": body.get("stage"),
                    "decision": body.get("decision"),
                    "blocking": body.get("blocking", []),
                    "domains": body.get("domains", {}),
                    "external_results_in_evidence": external,
                    "evidence_result_ids": evidence,
                    "at": e["time"],
                }
            )
        elif e["kind"] == "gate.override":
            statements.append(
                {
                    "kind": "override",
                    "cites": [i],
                    "decision_id": body.get("decision_id"),
                    "stage": body.get("stage"),
                    "decider": body.get("decider"),
                    "role": body.get("role"),
                    "justification": body.get("justification"),
                    "blocking": body.get("blocking", []),
                    "at": e["time"],
                }
            )
    statements += _findings(ordered)
    statements += _publications(ordered, calendar)
    return statements


def _publications(ordered: Sequence[tuple[int, Mapping[str, Any]]], calendar: Calendar) -> list[dict[str, Any]]:
    """Each evaluator report's publication clock: deadline, every extension with its justification, publication."""
    reports: dict[str, dict[str, Any]] = {}
    for i, e in ordered:
        body = e["body"]
        if e["kind"] not in ("report.extended", "report.published"):
            continue
        row = reports.setdefault(
            str(body.get("report_id")),
            {
                "kind": "publication",
                "cites": [],
                "report": body.get("report_id"),
                "evaluator": body.get("evaluator"),
                "submitted_at": body.get("submitted_at"),
                "extensions": [],
                "published_at": None,
                "reason": None,
                "business_days_to_publication": None,
            },
        )
        row["cites"].append(i)
        if e["kind"] == "report.extended":
            row["extensions"].append(
                {
                    "index": i,
                    "business_days": body.get("business_days"),
                    "previous_deadline": body.get("previous_deadline"),
                    "new_deadline": body.get("new_deadline"),
                    "justification": body.get("justification"),
                    "decider": body.get("decider"),
                    "role": body.get("role"),
                }
            )
        else:
            row["published_at"] = body.get("published_at")
            row["reason"] = body.get("reason")
            row["submitted_at"] = body.get("submitted_at") or row["submitted_at"]
            if row["submitted_at"] and row["published_at"]:
                start, end = parse_time(str(row["submitted_at"])), parse_time(str(row["published_at"]))
                row["business_days_to_publication"] = calendar.business_days(start, end)
    return list(reports.values())


def _findings(ordered: Sequence[tuple[int, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Red-team findings by severity, each with its latest triage status."""
    findings: dict[str, dict[str, Any]] = {}
    for i, e in ordered:
        body = e["body"]
        if e["kind"] == "redteam.finding":
            findings[str(body.get("finding"))] = {
                "kind": "finding",
                "cites": [i],
                "finding": body.get("finding"),
                "evaluator": body.get("evaluator"),
                "variant": body.get("variant"),
                "category": body.get("category"),
                "severity": body.get("severity"),
                "status": "open",
            }
        elif e["kind"] == "redteam.triage" and str(body.get("finding")) in findings:
            row = findings[str(body.get("finding"))]
            row["status"] = body.get("status")
            row["severity"] = body.get("severity", row["severity"])
            row["cites"].append(i)
    if not findings:
        return []
    rows = list(findings.values())
    order = {s: n for n, s in enumerate(SEVERITIES)}
    rows.sort(key=lambda r: (order.get(str(r["severity"]), len(order)), r["cites"][0]))
    counts: dict[str, int] = {}
    for r in rows:
        counts[str(r["severity"])] = counts.get(str(r["severity"]), 0) + 1
    summary = {
        "kind": "findings_by_severity",
        "cites": sorted(c for r in rows for c in r["cites"]),
        "counts": counts,
        "open": sum(1 for r in rows if r["status"] == "open"),
    }
    return [summary, *rows]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("an entry repeats a key")
    return dict(pairs)


def parse_cited(text: str) -> dict[str, Any]:
    """Parse one cited entry unambiguously (no repeated keys, the required fields present).

    Its exact text is what the inclusion proof covers, so every reader parses the same values;
    the full canonical-form check of the bundle verifier is not needed for that.
    """
    data = json.loads(text, object_pairs_hook=_no_duplicates)
    if not isinstance(data, dict) or not all(k in data for k in ("v", "id", "kind", "time", "body")):
        raise ValueError("not a ledger entry")
    return data


def years_of(entries: Iterable[Mapping[str, Any]]) -> list[int]:
    """Return the calendar years the entries' times span (for the embedded holiday list)."""
    years = sorted({parse_time(e["time"]).year for e in entries})
    return list(range(years[0], years[-1] + 1)) if years else []


# ---------------------------------------------------------------- offline verification


def verify_model_report(
    report: Mapping[str, Any],
    lab_key: str,
    *,
    witnesses: Sequence[WitnessVerifier] = (),
    quorum: int = 0,
) -> list[str]:
    """Re-check a Model Report offline; return every problem (empty: every statement holds)."""
    problems: list[str] = []
    if report.get("format") != FORMAT:
        return [f"unknown report format {report.get('format')!r}"]
    try:
        lab = Verifier.parse(lab_key)
        checkpoint = verify_checkpoint(str(report["checkpoint"]), lab, lab.name)
    except (NoteError, KeyError) as exc:
        return [f"checkpoint: {exc}"]
    if quorum:
        valid, bad = cosignatures(str(report["checkpoint"]), witnesses)
        problems += bad
        if len(valid) < quorum:
            problems.append(f"the checkpoint has {len(valid)} valid cosignature(s), fewer than the quorum of {quorum}")
    entries: dict[int, dict[str, Any]] = {}
    for item in report.get("entries", []):
        index = int(item["index"])
        text = str(item["entry"])
        try:
            proof = [base64.b64decode(p, validate=True) for p in item["proof"]]
            verify_inclusion(leaf_hash(text.encode()), index, checkpoint.size, proof, checkpoint.root)
            entries[index] = parse_cited(text)
        except (ProofError, ValueError, TypeError) as exc:
            problems.append(f"entry {index}: not proven in the checkpoint ({exc})")
    version_hash = str(report.get("version_hash", ""))
    grants = {e["body"].get("grant") for e in entries.values() if e.get("kind") == "grant.issued"}
    padded = [i for i, e in entries.items() if not is_relevant(e, str(report.get("model")), version_hash, grants)]
    if padded:
        problems.append(f"entries {padded} do not speak about {report.get('model')}@{version_hash[:12]}")
    described = report.get("calendar") or {}
    calendar = Calendar.from_description(described)
    expected_calendar = calendar.describe(described.get("years", []))
    if {k: described.get(k) for k in expected_calendar} != expected_calendar:
        problems.append("the calendar's holiday list does not follow from its rule and its own holidays")
    derived = derive(entries, version_hash, calendar, checkpoint.root)
    stated = list(report.get("statements", []))
    if len(derived) != len(stated):
        problems.append(f"the report makes {len(stated)} statements where its entries support {len(derived)}")
    for n, (mine, theirs) in enumerate(zip(derived, stated, strict=False)):
        if _canon(mine) != _canon(theirs):
            fields = sorted(k for k in set(mine) | set(theirs) if _canon(mine.get(k)) != _canon(theirs.get(k)))
            problems.append(f"statement {n} ({theirs.get('kind')}, entries {mine['cites']}) differs in {fields}")
    return problems


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# ---------------------------------------------------------------- Markdown


def _days(before: Sequence[Mapping[str, Any]]) -> str:
    if not before:
        return "no stage change yet"
    return "; ".join(f"{b['business_days']} before → {b['stage']} ({b['at'][:10]}, #{b['index']})" for b in before)


def _metrics(metrics: Any) -> str:
    if not isinstance(metrics, dict):
        return "committed (embargo)"
    parts = []
    for name, m in sorted(metrics.items()):
        if isinstance(m, dict) and "value" in m:
            ci = m.get("ci95")
            parts.append(f"{name} {m['value']:.3g}" + (f" [95% CI {ci[0]:.3g}–{ci[1]:.3g}]" if ci else ""))
        else:
            parts.append(f"{name} {m}")
    return ", ".join(parts)


def render_markdown(report: Mapping[str, Any]) -> str:
    """Render the section as Markdown; the verifiable JSON follows in a fenced block."""
    cp_lines = str(report["checkpoint"]).split("\n")
    names = report.get("witnessed_by") or []
    witnessed = f"cosigned by {', '.join(names)}" if names else "not witnessed"
    out = [
        f"## External evaluation: {report['model']}@{report['version']}",
        "",
        f"Version `{report['version_hash'][:16]}…`. Every statement cites its ledger entry (#index), proven "
        f"included in checkpoint {cp_lines[1]} of `{cp_lines[0]}` ({witnessed}). "
        f"Business days: calendar `{report['calendar']['name']}`. Check with "
        "`airlock-verify --model-report FILE --key LAB_KEY [--witness KEY … --quorum K]`.",
        "",
        "### Access",
        "",
        "| evaluator | scopes | variants | access | business days of access | quotas/terms | cites |",
        "|---|---|---|---|---|---|---|",
    ]
    statements = report["statements"]
    for s in statements:
        if s["kind"] == "access":
            committed = f"committed `{(s['quotas_commitment'] or '-')[:12]}…`"
            window = f"{s['from'][:10]} → {(s['until'] or 'open')[:10]}"
            cites = ", ".join(f"#{c}" for c in s["cites"])
            out.append(
                f"| {s['evaluator']} | {', '.join(s['scopes'])} | {', '.join(s['variants'])} | {window} | "
                f"{_days(s['business_days_before_stage_changes'])} | {committed} | {cites} |"
            )
    out += ["", "### Results attested", ""]
    for s in statements:
        if s["kind"] == "result":
            name = s["task"] if s["suite"] in (None, s["task"]) else f"{s['suite']}/{s['task']}"
            sel = s["sample_selection"]
            out.append(
                f"- {s['evaluator']}: {name} on `{s['variant']}` ({s['samples']} samples"
                f"{', fine-tuned' if s['elicitation']['fine_tuned'] else ''}): {_metrics(s['metrics'])}; samples "
                f"{sel['indices']} drawn from the checkpoint root, shown as the log commitment "
                f"`{(sel['commitment'] or '-')[:12]}…` (#{s['cites'][0]})"
            )
    out += ["", "### Red-team findings", ""]
    for s in statements:
        if s["kind"] == "findings_by_severity":
            counts = ", ".join(f"{n} {sev}" for sev, n in s["counts"].items())
            out.append(f"- by severity: {counts}; {s['open']} still open")
        elif s["kind"] == "finding":
            cites = ", ".join(f"#{c}" for c in s["cites"])
            out.append(
                f"- {s['severity']}: {s['category']} on `{s['variant']}` by {s['evaluator']}, {s['status']} ({cites})"
            )
    if not any(s["kind"] == "findings_by_severity" for s in statements):
        out.append("- none recorded for this version")
    out += ["", "### Evaluator reports and the publication clock", ""]
    for s in statements:
        if s["kind"] != "publication":
            continue
        cites = ", ".join(f"#{c}" for c in s["cites"])
        if s["published_at"]:
            days = s["business_days_to_publication"]
            waited = f", {days} business days after submission" if days is not None else ""
            line = f"- {s['report']} by {s['evaluator']}: published {s['published_at'][:10]} ({s['reason']}{waited})"
        else:
            line = f"- {s['report']} by {s['evaluator']}: submitted {str(s['submitted_at'])[:10]}, not yet published"
        out.append(f"{line} ({cites})")
        for x in s["extensions"]:
            out.append(
                f"  - delayed by {x['decider']} ({x['role']}): +{x['business_days']} business days to "
                f"{str(x['new_deadline'])[:10]}: “{x['justification']}” (#{x['index']})"
            )
    if not any(s["kind"] == "publication" for s in statements):
        out.append("- none published or delayed for this version")
    out += ["", "### Stage changes, gate decisions and overrides", ""]
    for s in statements:
        if s["kind"] == "stage":
            out.append(f"- {s['at'][:10]}: stage {s['from']} → {s['to']} (#{s['cites'][0]})")
        elif s["kind"] == "gate":
            used = ", ".join(s["external_results_in_evidence"]) or "none"
            out.append(
                f"- {s['at'][:10]}: gate {s['decision']} for → {s['stage']}; external results among its evidence: "
                f"{used} (#{s['cites'][0]})"
            )
        elif s["kind"] == "override":
            out.append(
                f"- {s['at'][:10]}: override by {s['decider']} ({s['role']}) into {s['stage']}: "
                f"“{s['justification']}” (#{s['cites'][0]})"
            )
    out += [
        "",
        "<details><summary>Verifiable record</summary>",
        "",
        "```json",
        json.dumps(report, indent=1),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(out)


def extract_json(text: str) -> dict[str, Any]:
    """Return the report from a JSON file's text or from a Markdown section's fenced JSON block."""
    stripped = text.lstrip()
    if stripped.startswith("{"):
        data = json.loads(stripped)
    else:
        start = text.index("```json\n") + len("```json\n")
        data = json.loads(text[start : text.index("\n```", start)])
    if not isinstance(data, dict):
        raise ValueError("a Model Report is a JSON object")
    return data
