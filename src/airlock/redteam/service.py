"""Red-teaming: sessions with granted variants through the mitigation pipeline, transcripts, findings, triage.

A red-teamer is one evaluator API key on a grant with the ``redteam`` scope; each key has its own
budget of active session hours (the grant's ``redteam_hours`` term). Active time is what a person
spends at the session: each turn charges the time since the previous activity, capped at
:data:`IDLE_CAP_S` (a session left open overnight costs five minutes, not eight hours), plus the
time the answers took. A turn is refused, with a sentence saying so, once the budget is spent.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from airlock.access import sealing
from airlock.access.acceptance import require_acceptance
from airlock.access.middleware import AuditContext
from airlock.access.models import Grant
from airlock.access.service import Principal
from airlock.backends.protocol import ChatCompletionRequest, Usage
from airlock.canonical import canonical_bytes
from airlock.db import utcnow
from airlock.errors import ConflictError, InvalidRequestError, NotFoundError, PermissionDeniedError
from airlock.redteam import events
from airlock.redteam.models import RedteamFinding, RedteamSession, RedteamTurn
from airlock.redteam.terms import redteam_hours
from airlock.registry.models import Model, ModelVersion
from airlock.serving import service as serving

SCOPE = "redteam"
CATEGORIES = ("bio", "chem", "cyber", "autonomy", "persuasion", "other")
SEVERITIES = events.SEVERITY_ORDER
GATING_SEVERITIES = ("high", "critical")
TRIAGE_STATUSES = ("acknowledged", "disputed", "fixed")
IDLE_CAP_S = 300.0
MAX_TARGETS = 2
MAX_PROMPT_CHARS = 20_000
MIN_DISPUTE_CHARS = 10


# ---------------------------------------------------------------- hours


@dataclass(frozen=True)
class Hours:
    """A red-teamer's budget on one grant: hours granted, hours used, hours left."""

    granted: float
    used: float

    @property
    def left(self) -> float:
        """Return the hours still available (never negative)."""
        return max(0.0, self.granted - self.used)


def hours_of(session: Session, grant: Grant, key_id: str) -> Hours:
    """Return the red-teaming hours of ``key_id`` on ``grant``: its budget and its active time so far."""
    used = session.scalar(
        select(func.coalesce(func.sum(RedteamSession.active_seconds), 0.0)).where(
            RedteamSession.grant_id == grant.id, RedteamSession.key_id == key_id
        )
    )
    return Hours(granted=redteam_hours(grant), used=float(used or 0.0) / 3600)


def _check_hours(hours: Hours, grant_id: str) -> None:
    if hours.left <= 0:
        raise PermissionDeniedError(
            f"you have used all {hours.granted:g} hours of red-teaming time on grant {grant_id}; "
            "ask the lab to extend the grant's redteam_hours to continue",
            code="redteam_hours_exhausted",
        )


# ---------------------------------------------------------------- sessions


async def start_session(
    state: serving.ServingState, principal: Principal, audit: AuditContext, targets: Sequence[str], title: str = ""
) -> RedteamSession:
    """Open a session with one granted variant, or two side by side (both of one model version)."""
    cleaned = [t.strip() for t in targets if t.strip()]
    if not 1 <= len(cleaned) <= MAX_TARGETS or len(set(cleaned)) != len(cleaned):
        raise InvalidRequestError("a session talks to one model id, or two different ones side by side", param="models")
    resolved = [(await serving.resolve_target(state, principal, t, [SCOPE], audit)).variant for t in cleaned]
    if len({r.version_id for r in resolved}) != 1:
        raise InvalidRequestError(
            "side-by-side variants must belong to the same model version; "
            "open one session per version to compare versions",
            param="models",
        )

    def _create() -> RedteamSession:
        with state.db.session() as session:
            _check_hours(hours_of(session, principal.grant, principal.key_id), principal.grant_id)
            # Transcripts are kept under retention_redteam (default full): not before the evaluator agreed to it.
            require_acceptance(session, principal.grant, "retention_redteam")
            row = RedteamSession(
                grant_id=principal.grant_id,
                key_id=principal.key_id,
                evaluator_id=principal.evaluator_id,
                model_id=resolved[0].model_id,
                version_id=resolved[0].version_id,
                targets=cleaned,
                variants=[r.variant_name for r in resolved],
                title=title.strip()[:200],
            )
            session.add(row)
            session.flush()
            session.expunge(row)
            return row

    row = await run_in_threadpool(_create)
    audit.detail["redteam_session"] = row.id
    return row


def own_session(session: Session, principal: Principal, session_id: str) -> RedteamSession:
    """Return the caller's own session (404 for anyone else's: sessions are private to their red-teamer)."""
    row = session.get(RedteamSession, session_id)
    if row is None or row.key_id != principal.key_id:
        raise NotFoundError(f"red-teaming session {session_id!r} does not exist", code="session_not_found")
    return row


def list_own_sessions(session: Session, principal: Principal) -> list[RedteamSession]:
    """Return the caller's sessions on its grant, newest first."""
    return list(
        session.scalars(
            select(RedteamSession)
            .where(RedteamSession.key_id == principal.key_id, RedteamSession.grant_id == principal.grant_id)
            .order_by(RedteamSession.created_at.desc(), RedteamSession.id)
        )
    )


def transcript(session: Session, session_id: str) -> list[RedteamTurn]:
    """Return a session's turns in order."""
    return list(
        session.scalars(select(RedteamTurn).where(RedteamTurn.session_id == session_id).order_by(RedteamTurn.index))
    )


def close_session(session: Session, principal: Principal, session_id: str) -> RedteamSession:
    """Close the caller's session and log its summary (hours, findings by severity; transcript committed)."""
    row = own_session(session, principal, session_id)
    if row.status == "closed":
        raise ConflictError(f"session {session_id} is already closed", code="session_closed")
    row.status = "closed"
    row.closed_at = utcnow()
    session.flush()
    plan = sealing.disposition(session, row.grant_id, "redteam")
    keep = plan.action == "keep"
    events.session_closed(session, row, keep_content=keep)
    # The closing event has committed to the transcript's digest; a grant that keeps no readable
    # transcripts keeps only each turn's counts, verdicts and timings from here on (under "sealed",
    # plus the transcript sealed to the evaluator: the same canonical JSON, so its SHA-256 is the
    # digest the ledger committed to).
    if not keep:
        turns = transcript(session, row.id)
        document = [{"index": t.index, "prompt": t.prompt, "responses": t.responses} for t in turns]
        name = "transcript.json"
        sealing.dispose(session, plan, kind="redteam_transcript", ref=row.id, name=name, data=canonical_bytes(document))
        for turn in turns:
            turn.prompt = ""
            turn.responses = [{**answer, "content": ""} for answer in turn.responses]
        session.flush()
    return row


# ---------------------------------------------------------------- turns


@dataclass
class TurnEvent:
    """One step of a turn as it streams: a piece of one variant's answer, or the finished turn."""

    kind: str  # "delta" | "turn"
    variant: str | None = None
    text: str = ""
    turn: RedteamTurn | None = None


@dataclass
class _Answer:
    variant: str
    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    blocked: bool = False
    usage: Usage | None = None


def _messages(history: list[RedteamTurn], position: int, prompt: str) -> list[dict[str, str]]:
    """Return the chat one variant sees: every earlier prompt with *its own* answer, then the new prompt."""
    messages: list[dict[str, str]] = []
    for turn in history:
        messages.append({"role": "user", "content": turn.prompt})
        answer = turn.responses[position]["content"] if position < len(turn.responses) else ""
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": prompt})
    return messages


async def take_turn(
    state: serving.ServingState,
    principal: Principal,
    audit: AuditContext,
    session_id: str,
    prompt: str,
    *,
    max_tokens: int | None = None,
) -> AsyncIterator[TurnEvent]:
    """Send ``prompt`` to every variant of the session in turn, yield their answers as they stream, keep the turn.

    Each variant is sampled through its own mitigation pipeline with the grant's quotas, exactly as
    ``/v1/chat/completions`` would, under the ``redteam`` scope. Checks run before anything streams,
    so a refused turn is a plain HTTP error.
    """
    if not prompt.strip():
        raise InvalidRequestError("a turn needs a prompt", param="content")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequestError(f"a prompt is at most {MAX_PROMPT_CHARS} characters", param="content")

    def _load() -> tuple[RedteamSession, list[RedteamTurn]]:
        with state.db.session() as session:
            row = own_session(session, principal, session_id)
            if row.status != "open":
                raise ConflictError(f"session {session_id} is closed; open a new one", code="session_closed")
            _check_hours(hours_of(session, principal.grant, principal.key_id), principal.grant_id)
            history = transcript(session, row.id)
            session.expunge_all()
            return row, history

    row, history = await run_in_threadpool(_load)
    audit.detail["redteam_session"] = row.id
    pipelines = []
    for position, model_id in enumerate(row.targets):
        request = ChatCompletionRequest.model_validate(
            {
                "model": model_id,
                "messages": _messages(history, position, prompt),
                "max_tokens": max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        pipelines.append((request, await serving.prepare(state, principal, audit, request, scope=SCOPE)))
    started = time.monotonic()
    answers: list[_Answer] = []
    verdicts: list[dict[str, Any]] = []
    for (request, pipeline), variant in zip(pipelines, row.variants, strict=True):
        answer = _Answer(variant)
        answers.append(answer)
        screened = pipeline.backend.screened_chat_stream(request)
        async for chunk in screened.chunks:
            if chunk.usage is not None and not chunk.choices:
                answer.usage = chunk.usage
                continue
            for choice in chunk.choices:
                if choice.delta.content:
                    answer.parts.append(choice.delta.content)
                    yield TurnEvent("delta", variant=variant, text=choice.delta.content)
                if choice.finish_reason:
                    answer.finish_reason = choice.finish_reason
        answer.blocked = any(v.blocked for v in screened.verdicts) or answer.finish_reason == "content_filter"
        verdicts += [
            {"variant": variant, "name": v.mitigation, "stage": v.stage, "blocked": v.blocked, "reason": v.reason}
            for v in screened.verdicts
        ]
    generation_s = time.monotonic() - started
    audit.tokens_in = sum(a.usage.prompt_tokens for a in answers if a.usage)
    audit.tokens_out = sum(a.usage.completion_tokens for a in answers if a.usage)
    if verdicts:
        audit.detail["mitigations"] = verdicts
        if any(v["blocked"] for v in verdicts):
            audit.outcome = "blocked"

    def _store() -> RedteamTurn:
        with state.db.session() as session:
            live = own_session(session, principal, session_id)
            now = utcnow()
            think_s = min(max((now - live.last_activity_at).total_seconds() - generation_s, 0.0), IDLE_CAP_S)
            turn = RedteamTurn(
                session_id=live.id,
                index=live.turns,
                prompt=prompt,
                responses=[
                    {
                        "variant": a.variant,
                        "content": "".join(a.parts),
                        "blocked": a.blocked,
                        "finish_reason": a.finish_reason,
                        "tokens_in": a.usage.prompt_tokens if a.usage else 0,
                        "tokens_out": a.usage.completion_tokens if a.usage else 0,
                    }
                    for a in answers
                ],
                active_seconds=round(think_s + generation_s, 3),
            )
            session.add(turn)
            live.turns += 1
            live.active_seconds += turn.active_seconds
            live.last_activity_at = now
            session.flush()
            session.expunge(turn)
            return turn

    turn = await run_in_threadpool(_store)
    audit.detail["redteam_turn"] = turn.index
    yield TurnEvent("turn", turn=turn)


async def run_turn(
    state: serving.ServingState,
    principal: Principal,
    audit: AuditContext,
    session_id: str,
    prompt: str,
    *,
    max_tokens: int | None = None,
) -> RedteamTurn:
    """Take a turn without streaming; return the stored turn."""
    async for event in take_turn(state, principal, audit, session_id, prompt, max_tokens=max_tokens):
        if event.turn is not None:
            return event.turn
    raise RuntimeError("a turn ended without being stored")  # take_turn always ends with the turn


# ---------------------------------------------------------------- findings


@dataclass(frozen=True)
class FindingDraft:
    """What a red-teamer says about one answer of one turn."""

    turn_index: int
    variant: str | None
    category: str
    severity: str
    title: str
    notes: str = ""


def flag_finding(session: Session, principal: Principal, session_id: str, draft: FindingDraft) -> RedteamFinding:
    """Record a finding on one variant's answer to one turn of the caller's session, and log it."""
    row = own_session(session, principal, session_id)
    if draft.category not in CATEGORIES:
        raise InvalidRequestError(
            f"unknown category {draft.category!r}; choose one of {', '.join(CATEGORIES)}", param="category"
        )
    if draft.severity not in SEVERITIES:
        raise InvalidRequestError(
            f"unknown severity {draft.severity!r}; choose one of {', '.join(SEVERITIES)}", param="severity"
        )
    title = draft.title.strip()
    if not title or len(title) > 200:
        raise InvalidRequestError("a finding needs a title of 1-200 characters", param="title")
    turn = session.scalar(
        select(RedteamTurn).where(RedteamTurn.session_id == row.id, RedteamTurn.index == draft.turn_index)
    )
    if turn is None:
        raise NotFoundError(f"session {row.id} has no turn {draft.turn_index}", code="turn_not_found")
    variant = draft.variant or row.variants[0]
    if variant not in row.variants:
        raise InvalidRequestError(
            f"variant {variant!r} is not part of this session ({', '.join(row.variants)})", param="variant"
        )
    finding = RedteamFinding(
        session_id=row.id,
        turn_id=turn.id,
        turn_index=turn.index,
        grant_id=row.grant_id,
        key_id=row.key_id,
        evaluator_id=row.evaluator_id,
        model_id=row.model_id,
        version_id=row.version_id,
        variant=variant,
        category=draft.category,
        severity=draft.severity,
        title=title,
        notes=draft.notes.strip(),
    )
    session.add(finding)
    session.flush()
    events.finding_flagged(session, finding, turn)
    return finding


def own_findings(session: Session, principal: Principal, session_id: str | None = None) -> list[RedteamFinding]:
    """Return the findings the caller flagged (optionally in one session), newest first."""
    stmt = select(RedteamFinding).where(RedteamFinding.key_id == principal.key_id)
    if session_id is not None:
        stmt = stmt.where(RedteamFinding.session_id == own_session(session, principal, session_id).id)
    return list(session.scalars(stmt.order_by(RedteamFinding.created_at.desc(), RedteamFinding.id)))


def list_findings(
    session: Session, *, model: str | None = None, status: str | None = None, severity: str | None = None
) -> list[RedteamFinding]:
    """Return every finding for the lab, newest first, optionally filtered."""
    stmt = select(RedteamFinding)
    if model:
        model_row = session.scalar(select(Model).where(Model.name == model))
        if model_row is None:
            return []  # a filter, not a resource: no such model has no findings
        stmt = stmt.where(RedteamFinding.model_id == model_row.id)
    if status:
        stmt = stmt.where(RedteamFinding.status == status)
    if severity:
        stmt = stmt.where(RedteamFinding.severity == severity)
    return list(session.scalars(stmt.order_by(RedteamFinding.created_at.desc(), RedteamFinding.id)))


def session_of(session: Session, finding: RedteamFinding) -> RedteamSession:
    """Return the session a finding was flagged in."""
    row = session.get(RedteamSession, finding.session_id)
    if row is None:
        raise NotFoundError(f"the session of finding {finding.id} does not exist", code="session_not_found")
    return row


def get_finding(session: Session, finding_id: str) -> RedteamFinding:
    """Return a finding by id (404 otherwise)."""
    row = session.get(RedteamFinding, finding_id)
    if row is None:
        raise NotFoundError(f"finding {finding_id!r} does not exist", code="finding_not_found")
    return row


@dataclass(frozen=True)
class Triage:
    """The lab's answer to a finding: acknowledged, disputed (with a reason) or fixed in a later version."""

    status: str
    reason: str = ""
    fixed_in: str | None = None


def triage_finding(session: Session, finding_id: str, triage: Triage, *, actor: str, role: str) -> RedteamFinding:
    """Record the lab's triage of a finding and log it; a dispute needs a reason, a fix a later version."""
    finding = get_finding(session, finding_id)
    if triage.status not in TRIAGE_STATUSES:
        raise InvalidRequestError(
            f"unknown triage status {triage.status!r}; choose one of {', '.join(TRIAGE_STATUSES)}", param="status"
        )
    reason = triage.reason.strip()
    fixed_in: ModelVersion | None = None
    if triage.status == "disputed" and len(reason) < MIN_DISPUTE_CHARS:
        raise InvalidRequestError(
            f"a dispute needs a reason of at least {MIN_DISPUTE_CHARS} characters", param="reason"
        )
    if triage.status == "fixed":
        if not triage.fixed_in:
            raise InvalidRequestError("say which version fixes the finding (fixed_in)", param="fixed_in")
        fixed_in = session.scalar(
            select(ModelVersion).where(
                ModelVersion.model_id == finding.model_id, ModelVersion.label == triage.fixed_in.strip()
            )
        )
        found_on = session.get(ModelVersion, finding.version_id)
        if fixed_in is None or found_on is None:
            raise NotFoundError(f"the model has no version {triage.fixed_in!r}", param="fixed_in")
        if (fixed_in.created_at, fixed_in.id) <= (found_on.created_at, found_on.id):
            raise InvalidRequestError(
                f"version {fixed_in.label!r} is not later than {found_on.label!r}, where the finding was made; "
                "a fix must come in a later version",
                param="fixed_in",
            )
    finding.status = triage.status
    finding.triage_reason = reason
    finding.fixed_in_version_id = fixed_in.id if fixed_in is not None else None
    finding.triaged_by = actor
    finding.triaged_at = utcnow()
    session.flush()
    events.finding_triaged(session, finding, role)
    return finding


# ---------------------------------------------------------------- the gate's view


def findings_against(session: Session, version: ModelVersion) -> list[RedteamFinding]:
    """Return the high and critical findings that still count against ``version``, oldest first.

    A finding made on this version or an earlier one of the same model counts while it is open or
    acknowledged; a dispute ends it; a fix ends it for the fixing version and later ones only.
    """
    rows = session.execute(
        select(RedteamFinding, ModelVersion)
        .join(ModelVersion, ModelVersion.id == RedteamFinding.version_id)
        .where(
            RedteamFinding.model_id == version.model_id,
            RedteamFinding.severity.in_(GATING_SEVERITIES),
            RedteamFinding.status != "disputed",
        )
        .order_by(RedteamFinding.created_at, RedteamFinding.id)
    ).all()
    fixed_ids = [f.fixed_in_version_id for f, _v in rows if f.fixed_in_version_id]
    fixes = (
        {v.id: v for v in session.scalars(select(ModelVersion).where(ModelVersion.id.in_(fixed_ids)))}
        if fixed_ids
        else {}
    )
    here = (version.created_at, version.id)
    counted = []
    for finding, found_on in rows:
        if (found_on.created_at, found_on.id) > here:
            continue  # found on a later version
        if finding.status == "fixed":
            fix = fixes.get(finding.fixed_in_version_id or "")
            if fix is None or (fix.created_at, fix.id) <= here:
                continue
        counted.append(finding)
    return counted
