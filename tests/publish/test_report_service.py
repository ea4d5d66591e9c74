"""Report service on SQLite and PostgreSQL: revisions, validation, embargo clock, agreement, reveal."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from airlock.canonical import canonical_bytes
from airlock.errors import ConflictError, InvalidRequestError, NotFoundError, PermissionDeniedError
from airlock.evals.models import SigningKey
from airlock.publish import redaction, service
from airlock.publish.models import Report, ReportRevision
from airlock.publish.service import DraftContent
from airlock.registry.models import ModelVersion, StageChange
from tests.publish.report_fixtures import Org, make_org, sync_fake_manifest

T0 = datetime(2030, 1, 1, tzinfo=UTC)
LONG_CLOCK = service.PublicationClock(business_days=3650)
BODY = "# Findings\n\nThe model [[redact:uplift detail]]explains step 3 of the zyloxin proxy[[/redact]] often.\n"


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Capture ledger events instead of (or before) the ledger records them."""
    seen: list[tuple[str, dict[str, Any]]] = []

    def record(session: Any, kind: str, body: dict[str, Any], *, confidential: dict[str, Any] | None = None) -> None:
        seen.append((kind, body))

    monkeypatch.setattr("airlock.ledger.service.record_event", record)
    return seen


@pytest.fixture
def world(db: Any, tmp_path: Path) -> Iterator[tuple[Any, Org]]:
    sync_fake_manifest(db)
    org = make_org(db, tmp_path, embargo_days=30)
    org.attest(db)
    yield db, org


def deploy(db: Any, at: datetime) -> None:
    """Move m1@v1 to deployed at a controlled time."""
    with db.session() as session:
        version = session.scalar(
            select(ModelVersion).where(ModelVersion.label == "v1", ModelVersion.content_hash == "a" * 64)
        )
        assert version is not None
        session.add(StageChange(version_id=version.id, from_stage=version.stage, to_stage="deployed", actor="t", at=at))
        version.stage, version.stage_changed_at = "deployed", at


def draft(db: Any, org: Org, body: str = BODY, **content: Any) -> str:
    content.setdefault("result_ids", org.results)
    with db.session() as session:
        report = service.create_report(
            session, org.principal(db), "m1@v1", DraftContent(title="Findings", body=body, **content), now=T0
        )
        return report.id


def call(db: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
    with db.session() as session:
        return fn(session, *args, **kwargs)


def get(db: Any, report_id: str) -> Report:
    with db.session() as session:
        report = session.get(Report, report_id)
        assert report is not None
        _ = [r.redactions for r in report.revisions]  # load while the session is open
        return report


def test_revisions_are_immutable_hash_chained_and_verifiable(world: tuple[Any, Org]) -> None:
    db, org = world
    rid = draft(db, org)
    p = org.principal(db)
    call(db, service.update_report, p, rid, DraftContent(title="Findings, revised"), now=T0)
    report = get(db, rid)
    first, second = report.revisions
    assert (first.number, second.number, report.current_revision) == (1, 2, 2)
    assert second.previous_hash == first.content_hash and first.previous_hash is None
    for rev in (first, second):
        assert rev.content_hash == hashlib.sha256(canonical_bytes(rev.document)).hexdigest()
        assert "zyloxin" not in canonical_bytes(rev.document).decode()
        (span,) = rev.redactions
        assert span.text == "explains step 3 of the zyloxin proxy" and span.reason == "uplift detail"
        assert redaction.verify_commitment(span.commitment, span.salt, span.text)
        assert f"sha256:{span.commitment}]]" in rev.public_body
    assert second.document["title"] == "Findings, revised" and second.source == first.source
    assert second.result_ids == org.results


def test_bad_input_is_refused_and_nothing_is_written(world: tuple[Any, Org], tmp_path: Path) -> None:
    db, org = world
    other = make_org(db, tmp_path, "org-b", embargo_days=1)
    theirs = other.attest(db)
    rid = draft(db, org)
    p = org.principal(db)

    def refused(content: DraftContent) -> tuple[type[Exception], str | None]:
        with pytest.raises((InvalidRequestError, NotFoundError)) as info:
            call(db, service.update_report, p, rid, content, now=T0)
        return type(info.value), info.value.code  # type: ignore[attr-defined]

    assert refused(DraftContent(result_ids=["res_nope"])) == (NotFoundError, "result_not_found")
    assert refused(DraftContent(result_ids=[theirs])) == (NotFoundError, "result_not_found")
    assert refused(DraftContent(attachment_ids=["ratt_nope"])) == (NotFoundError, "attachment_not_found")
    assert refused(DraftContent(body="[[redact]]open")) == (InvalidRequestError, "malformed_redaction")
    assert refused(DraftContent(title="  ")) == (InvalidRequestError, None)
    with db.session() as session:  # a result whose signing key was revoked no longer verifies
        key = session.scalars(select(SigningKey)).first()
        assert key is not None
        key.revoked_at = T0
    assert refused(DraftContent(result_ids=org.results)) == (InvalidRequestError, "result_unverifiable")
    with pytest.raises(PermissionDeniedError):
        call(db, service.create_report, p, "m2@v1", DraftContent(title="t", body="b"), now=T0)
    with pytest.raises(NotFoundError):
        call(db, service.create_report, p, "m1@v9", DraftContent(title="t", body="b"), now=T0)
    assert get(db, rid).current_revision == 1
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(ReportRevision)) == 1
    # Another organisation's report does not exist for them.
    with pytest.raises(NotFoundError):
        call(db, service.own_report, other.principal(db), rid)


def test_embargo_counts_from_deployment_and_publishes_once(
    world: tuple[Any, Org], events: list[tuple[str, dict[str, Any]]]
) -> None:
    db, org = world
    rid = draft(db, org)
    p = org.principal(db)
    # A publication clock longer than every date here: this test is about the embargo alone.
    call(db, service.submit_report, p, rid, now=T0, clock=LONG_CLOCK)
    embargo = call(db, lambda s: service.embargo_of(s, s.get(Report, rid)))
    assert embargo.ends_at is None and "not deployed" in embargo.rule
    assert call(db, service.publish_due, now=T0 + timedelta(days=3650)) == []

    deploy(db, T0 + timedelta(days=10))
    embargo = call(db, lambda s: service.embargo_of(s, s.get(Report, rid)))
    assert embargo.ends_at == T0 + timedelta(days=40) and embargo.deployed_at == T0 + timedelta(days=10)
    assert call(db, service.publish_due, now=T0 + timedelta(days=40) - timedelta(seconds=1)) == []
    with pytest.raises(NotFoundError):
        call(db, service.public_report, rid, now=T0 + timedelta(days=39))
    assert events == []
    # The public read itself publishes lazily once the date has passed.
    call(db, service.public_report, rid, now=T0 + timedelta(days=40))
    assert call(db, service.publish_due, now=T0 + timedelta(days=41)) == []
    report = get(db, rid)
    assert (report.status, report.published_reason, report.published_revision) == ("published", "embargo", 1)
    ((kind, body),) = events
    assert kind == "report.published"
    assert body["report_id"] == rid and body["content_hash"] == report.revisions[0].content_hash
    assert body["result_ids"] == org.results and body["variants"] == ["helpful-only"]
    assert body["commitments"] == [report.revisions[0].redactions[0].commitment]
    assert body["evaluator"] == "org-a" and body["model"] == "m1" and body["version"] == "v1"
    with pytest.raises(ConflictError):
        call(db, service.update_report, p, rid, DraftContent(title="sneaky"), now=T0 + timedelta(days=42))


def test_longest_embargo_of_every_grant_involved_wins(world: tuple[Any, Org], tmp_path: Path) -> None:
    db, org = world
    second = make_org(db, tmp_path, "org-a", embargo_days=90)  # another grant of the same organisation
    res = second.attest(db)
    rid = draft(db, org, result_ids=[*org.results, res])
    deploy(db, T0)
    embargo = call(db, lambda s: service.embargo_of(s, s.get(Report, rid)))
    assert embargo.ends_at == T0 + timedelta(days=90)


def test_a_grant_without_embargo_term_needs_agreement(db: Any, tmp_path: Path) -> None:
    sync_fake_manifest(db)
    org = make_org(db, tmp_path)  # embargo_days=None
    org.attest(db)
    rid = draft(db, org)
    call(db, service.submit_report, org.principal(db), rid, now=T0, clock=LONG_CLOCK)
    deploy(db, T0)
    embargo = call(db, lambda s: service.embargo_of(s, s.get(Report, rid)))
    assert embargo.ends_at is None and "no embargo term" in embargo.rule
    assert call(db, service.publish_due, now=T0 + timedelta(days=5000)) == []
    # The publication clock still runs: it publishes when the agreement never comes.
    assert call(db, service.publish_due, now=get(db, rid).publish_by) == [rid]


def test_early_release_needs_both_sides_for_the_same_revision(
    world: tuple[Any, Org], events: list[tuple[str, dict[str, Any]]]
) -> None:
    db, org = world
    rid = draft(db, org)
    p = org.principal(db)
    with pytest.raises(ConflictError):  # nothing submitted yet
        call(db, service.request_release, p, rid, now=T0)
    with pytest.raises(NotFoundError):  # the lab cannot see a draft never submitted
        call(db, service.agree_release, rid, "admin:lab", now=T0)
    call(db, service.submit_report, p, rid, now=T0)
    call(db, service.agree_release, rid, "admin:lab", now=T0)
    assert get(db, rid).status == "submitted"
    # Changing the text after the lab agreed voids the agreement: the lab agreed to other content.
    call(db, service.update_report, p, rid, DraftContent(body=BODY + "\nMore."), now=T0)
    report = get(db, rid)
    assert (report.status, report.release_agreed_revision, report.submitted_revision) == ("draft", None, 1)
    call(db, service.submit_report, p, rid, now=T0)
    call(db, service.request_release, p, rid, now=T0 + timedelta(hours=1))
    assert get(db, rid).status == "submitted" and events == []
    call(db, service.add_comment, rid, "lab", "reviewer", "We disagree with the elicitation.", now=T0)
    call(db, service.agree_release, rid, "admin:lab", now=T0 + timedelta(hours=2))
    report = get(db, rid)
    assert (report.status, report.published_reason, report.published_revision) == ("published", "agreement", 2)
    assert report.published_at == T0 + timedelta(hours=2)
    assert [k for k, _ in events] == ["report.published"] and events[0][1]["revision"] == 2
    with pytest.raises(ConflictError):
        call(db, service.agree_release, rid, "admin:lab", now=T0)


def test_reveal_opens_a_commitment_publicly(world: tuple[Any, Org], events: list[tuple[str, dict[str, Any]]]) -> None:
    db, org = world
    rid = draft(db, org)
    p = org.principal(db)
    call(db, service.submit_report, p, rid, now=T0)
    with pytest.raises(ConflictError):
        call(db, service.reveal, p, rid, 1, now=T0)
    call(db, service.request_release, p, rid, now=T0)
    call(db, service.agree_release, rid, "admin:lab", now=T0)
    with pytest.raises(NotFoundError):
        call(db, service.reveal, p, rid, 2, now=T0)
    call(db, service.reveal, p, rid, 1, now=T0 + timedelta(days=400))
    with pytest.raises(ConflictError):
        call(db, service.reveal, p, rid, 1, now=T0)
    span = get(db, rid).revisions[0].redactions[0]
    assert span.revealed_at == T0 + timedelta(days=400)
    kind, body = events[-1]
    assert kind == "report.revealed" and body["commitment"] == span.commitment
    assert redaction.verify_commitment(body["commitment"], body["salt"], body["text"])


def test_publication_happens_once_under_concurrent_checks(
    world: tuple[Any, Org], events: list[tuple[str, dict[str, Any]]]
) -> None:
    db, org = world
    rid = draft(db, org)
    call(db, service.submit_report, org.principal(db), rid, now=T0)
    deploy(db, T0)
    later = T0 + timedelta(days=31)
    # Two sessions both load the submitted report before either publishes.
    with db.session() as a, db.session() as b:
        ra, rb = a.get(Report, rid), b.get(Report, rid)
        assert ra is not None and rb is not None and ra.status == rb.status == "submitted"
        assert service.publish_if_due(a, ra, later) is True
        a.commit()
        assert service.publish_if_due(b, rb, later) is False
    assert [k for k, _ in events] == ["report.published"]


def test_a_due_publication_survives_a_refused_edit(
    world: tuple[Any, Org], events: list[tuple[str, dict[str, Any]]]
) -> None:
    db, org = world
    rid = draft(db, org)
    p = org.principal(db)
    call(db, service.submit_report, p, rid, now=T0)
    deploy(db, T0)
    # The edit finds the embargo over: the report is published and the edit refused, not both undone.
    with pytest.raises(ConflictError):
        call(db, service.update_report, p, rid, DraftContent(title="late edit"), now=T0 + timedelta(days=31))
    report = get(db, rid)
    assert (report.status, report.current_revision) == ("published", 1)
    assert [k for k, _ in events] == ["report.published"]


def test_concurrent_edits_get_consecutive_revisions(world: tuple[Any, Org]) -> None:
    import threading

    db, org = world
    rid = draft(db, org)
    p = org.principal(db)
    errors: list[BaseException] = []

    def edit(worker: int) -> None:
        try:
            for i in range(4):
                call(db, service.update_report, p, rid, DraftContent(title=f"w{worker} e{i}"), now=T0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=edit, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    report = get(db, rid)
    assert [r.number for r in report.revisions] == list(range(1, 14)) and report.current_revision == 13
    chain = [r.previous_hash for r in report.revisions[1:]]
    assert chain == [r.content_hash for r in report.revisions[:-1]]


def test_the_background_publisher_releases_reports_whose_embargo_passed(
    world: tuple[Any, Org], events: list[tuple[str, dict[str, Any]]]
) -> None:
    db, org = world
    due, waiting = draft(db, org), draft(db, org)
    call(db, service.submit_report, org.principal(db), due, now=T0)
    deploy(db, datetime.now(UTC) - timedelta(days=31))  # the grant's 30-day embargo has just passed
    publisher = service.DuePublisher(db, interval_s=0.05)
    publisher.start()
    try:
        deadline = time.monotonic() + 10
        while get(db, due).status != "published" and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        publisher.stop()
    assert (get(db, due).status, get(db, due).published_reason) == ("published", "embargo")
    assert get(db, waiting).status == "draft"  # never submitted: nothing to publish
    assert [kind for kind, _ in events] == ["report.published"]


def _row_is_locked(db: Any, report_id: str) -> bool:
    """Whether another connection is refused a write to the report's row right now."""
    from sqlalchemy.exc import OperationalError

    sqlite = db.engine.dialect.name == "sqlite"
    with db.engine.connect() as other:
        other.exec_driver_sql("PRAGMA busy_timeout = 0" if sqlite else "SET lock_timeout = '200ms'")
        try:
            other.execute(update(Report).where(Report.id == report_id).values(status="submitted"))
        except OperationalError:
            return True
        finally:
            other.rollback()
            if sqlite:
                other.exec_driver_sql("PRAGMA busy_timeout = 10000")
        return False


def test_a_lazy_publication_keeps_the_lock_of_a_locked_edit(
    world: tuple[Any, Org], events: list[tuple[str, dict[str, Any]]]
) -> None:
    db, org = world
    p = org.principal(db)
    rids = [draft(db, org), draft(db, org)]
    for rid in rids:
        call(db, service.submit_report, p, rid, now=T0)
    deploy(db, T0)
    later = T0 + timedelta(days=31)
    for rid, side in zip(rids, ("evaluator", "lab"), strict=True):
        with db.session() as session:
            # The embargo is over: fetching for a locked change publishes (and commits) first ...
            if side == "evaluator":
                report = service.own_report(session, p, rid, later, lock=True)
            else:
                report = service.lab_report(session, rid, later, lock=True)
            assert report.status == "published"
            # ... and the report must still be locked for the rest of the caller's transaction.
            assert _row_is_locked(db, rid)
        assert get(db, rid).status == "published"
    assert [k for k, _ in events] == ["report.published"] * 2


def test_a_reveal_on_stale_state_is_refused_and_logged_once(
    world: tuple[Any, Org], events: list[tuple[str, dict[str, Any]]]
) -> None:
    db, org = world
    rid = draft(db, org)
    p = org.principal(db)
    call(db, service.submit_report, p, rid, now=T0)
    call(db, service.request_release, p, rid, now=T0)
    call(db, service.agree_release, rid, "admin:lab", now=T0)
    with db.session() as stale:
        # This session saw the span hidden; another reveals it before this one acts.
        report = service.own_report(stale, p, rid, T0)
        assert report.revisions[0].redactions[0].revealed_at is None
        call(db, service.reveal, p, rid, 1, now=T0 + timedelta(days=1))
        with pytest.raises(ConflictError) as info:
            service.reveal(stale, p, rid, 1, now=T0 + timedelta(days=2))
        assert info.value.code == "already_revealed"
    assert [k for k, _ in events] == ["report.published", "report.revealed"]
    assert get(db, rid).revisions[0].redactions[0].revealed_at == T0 + timedelta(days=1)
