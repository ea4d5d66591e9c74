"""The publication clock: a submitted report goes public after at most N business days, unless extended.

Time is injected everywhere (``now=`` and the publisher's clock), so nothing here waits for a date.
"""

from __future__ import annotations

import html
import threading
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from airlock.access.service import create_admin_token
from airlock.businessdays import Calendar
from airlock.errors import ConflictError, InvalidRequestError, PermissionDeniedError
from airlock.ledger import service as ledger
from airlock.publish import pages, schemas, service
from airlock.publish.service import DraftContent, PublicationClock
from tests.conftest import HTTP_TIMEOUT, Lab
from tests.publish.report_fixtures import Org, make_org, sync_fake_manifest
from tests.publish.test_report_service import call, draft, get

FRIDAY = datetime(2030, 1, 4, 12, tzinfo=UTC)  # 2030-01-04 is a Friday
WEEKENDS = Calendar(name="weekends", base="none")
CLOCK = PublicationClock(business_days=3, calendar=WEEKENDS, max_extension_days=10)
WHY = "A critical <script>alert(1)</script> vulnerability in the model's serving stack is being patched first."


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Capture ledger events (from every thread) instead of recording them."""
    seen: list[tuple[str, dict[str, Any]]] = []
    lock = threading.Lock()

    def record(session: Any, kind: str, body: dict[str, Any], *, confidential: dict[str, Any] | None = None) -> None:
        with lock:
            seen.append((kind, body))

    monkeypatch.setattr("airlock.ledger.service.record_event", record)
    return seen


@pytest.fixture
def submitted(db: Any, tmp_path: Path) -> tuple[Any, Org, str]:
    """A report submitted on a Friday under a 3-business-day clock; no embargo date (not deployed)."""
    sync_fake_manifest(db)
    org = make_org(db, tmp_path, embargo_days=30)
    org.attest(db)
    rid = draft(db, org)
    call(db, service.submit_report, org.principal(db), rid, now=FRIDAY, clock=CLOCK)
    return db, org, rid


def extend(db: Any, rid: str, now: datetime, *, days: int = 2, role: str = "decider", why: str = WHY) -> Any:
    return call(
        db,
        service.extend_publication,
        rid,
        business_days=days,
        justification=why,
        decider="dana",
        role=role,
        clock=CLOCK,
        now=now,
    )


WEDNESDAY = FRIDAY + timedelta(days=5)  # Mon, Tue, Wed: three business days on


SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@SQLITE_ONLY
def test_the_clock_publishes_after_n_business_days(
    submitted: tuple[Any, Org, str], events: list[tuple[str, dict[str, Any]]]
) -> None:
    db, org, rid = submitted
    p = org.principal(db)
    assert get(db, rid).publish_by == WEDNESDAY
    # Editing stops the clock (a draft never goes public); submitting again restarts it.
    edited = draft(db, org)
    call(db, service.submit_report, p, edited, now=FRIDAY, clock=CLOCK)
    call(db, service.update_report, p, edited, DraftContent(title="Revised"), now=FRIDAY + timedelta(days=1))
    assert get(db, edited).publish_by is None
    assert call(db, service.publish_due, now=WEDNESDAY - timedelta(seconds=1)) == []
    assert call(db, service.publish_due, now=WEDNESDAY) == [rid]
    report = get(db, rid)
    assert (report.status, report.published_reason, report.published_at) == ("published", "deadline", WEDNESDAY)
    ((kind, body),) = events
    assert kind == "report.published" and body["reason"] == "deadline"
    assert body["publish_by"] == WEDNESDAY.isoformat() and body["submitted_at"] == FRIDAY.isoformat()
    monday = FRIDAY + timedelta(days=3)
    call(db, service.submit_report, p, edited, now=monday, clock=CLOCK)
    assert get(db, edited).publish_by == monday + timedelta(days=3)
    # An extension asked for once the deadline has passed is too late: the read that finds it due publishes it.
    with pytest.raises(ConflictError) as late:
        extend(db, edited, monday + timedelta(days=3))
    assert late.value.code == "report_published" and get(db, edited).status == "published"
    assert [k for k, _ in events] == ["report.published", "report.published"]


def test_an_extension_is_the_deciders_justified_and_public(
    submitted: tuple[Any, Org, str], events: list[tuple[str, dict[str, Any]]]
) -> None:
    db, _org, rid = submitted
    monday = FRIDAY + timedelta(days=3)
    with pytest.raises(PermissionDeniedError) as denied:
        extend(db, rid, monday, role="admin")
    assert denied.value.code == "not_decider"
    with pytest.raises(InvalidRequestError) as short:
        extend(db, rid, monday, why="because")
    assert short.value.code == "justification_required"
    with pytest.raises(InvalidRequestError):
        extend(db, rid, monday, days=11)  # over the policy's maximum per extension
    assert events == [] and get(db, rid).publish_by == WEDNESDAY

    row = extend(db, rid, monday, days=2)
    friday_after = WEDNESDAY + timedelta(days=2)
    assert (row.previous_deadline, row.new_deadline, row.business_days) == (WEDNESDAY, friday_after, 2)
    ((kind, body),) = events
    assert kind == "report.extended" and body["justification"] == WHY and body["decider"] == "dana"
    assert body["new_deadline"] == friday_after.isoformat() and body["previous_deadline"] == WEDNESDAY.isoformat()
    assert "token_id" not in body  # which token acted stays in the confidential part

    # The old deadline no longer publishes; the new one does, and the public page shows why it waited.
    assert call(db, service.publish_due, now=WEDNESDAY + timedelta(hours=1)) == []
    assert call(db, service.publish_due, now=friday_after) == [rid]
    with db.session() as session:
        report = service.public_report(session, rid, friday_after)
        view = schemas.public_view(session, report, None)
    assert [x.justification for x in view.clock.extensions] == [WHY]
    assert view.published_reason == "deadline" and view.clock.publish_by == friday_after
    assert "Publication delayed by the lab" in schemas.public_markdown(view)
    page = pages.render_page(view)
    assert "Publication delayed by the lab" in page and html.escape(WHY) in page and "<script>" not in page
    # A late extension cannot reach back: the report is public.
    with pytest.raises(ConflictError) as late:
        extend(db, rid, friday_after + timedelta(days=1))
    assert late.value.code == "report_published"


def test_replicas_publish_each_report_exactly_once(
    db: Any, tmp_path: Path, events: list[tuple[str, dict[str, Any]]]
) -> None:
    sync_fake_manifest(db)
    org = make_org(db, tmp_path, embargo_days=30)
    org.attest(db)
    ids = [draft(db, org) for _ in range(4)]
    for rid in ids:
        call(db, service.submit_report, org.principal(db), rid, now=FRIDAY, clock=CLOCK)
    # Four replicas' publishers, each with the same injected clock, run one pass at the same moment.
    publishers = [service.DuePublisher(db, interval_s=60, clock=lambda: WEDNESDAY) for _ in range(4)]
    start = threading.Barrier(len(publishers))
    passes: list[list[str]] = []
    errors: list[BaseException] = []

    def one_pass(publisher: service.DuePublisher) -> None:
        start.wait()
        try:
            passes.append(publisher.run_once())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one_pass, args=(p,)) for p in publishers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    published = [rid for one in passes for rid in one]
    assert sorted(published) == sorted(ids)  # each once, whichever replica got there first
    assert sorted(body["report_id"] for kind, body in events if kind == "report.published") == sorted(ids)
    assert all(get(db, rid).status == "published" for rid in ids)


# ---------------------------------------------------------------- over HTTP, with the policy's clock


def _write_policy(lab: Lab, publication: dict[str, Any]) -> None:
    policy = yaml.safe_load(resources.files("airlock").joinpath("data/example-policy.yaml").read_text())
    policy["publication"] = publication
    path = lab.server.app.state.gateway.settings.policy_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(policy))


@SQLITE_ONLY
def test_the_policy_sets_the_clock_and_the_decider_extends_over_http(lab: Lab, tmp_path: Path) -> None:
    _write_policy(lab, {"max_business_days": 5, "calendar": "weekends", "max_extension_business_days": 3})
    org = make_org(lab.db, tmp_path, "org-a", embargo_days=30)
    result_id = org.attest(lab.db)
    http = httpx.Client(
        base_url=lab.url + "/v1/airlock", headers={"Authorization": f"Bearer {org.token}"}, timeout=HTTP_TIMEOUT
    )
    created = http.post(
        "/reports", json={"model": "m1@v1", "title": "Uplift", "body": "Text.", "result_ids": [result_id]}
    )
    rid = created.json()["id"]
    submitted = http.post(f"/reports/{rid}/submit").json()
    clock = submitted["clock"]
    assert (clock["business_days"], clock["calendar"], clock["extensions"]) == (5, "weekends", [])
    deadline = datetime.fromisoformat(clock["publish_by"])
    assert WEEKENDS.add_business_days(datetime.fromisoformat(clock["submitted_at"]), 5) == deadline

    def lab_client(role: str) -> httpx.Client:
        with lab.db.session() as session:
            _row, token = create_admin_token(session, f"lab-{role}", role)
        return httpx.Client(
            base_url=lab.url + "/v1/airlock/admin", headers={"Authorization": f"Bearer {token}"}, timeout=HTTP_TIMEOUT
        )

    body = {"business_days": 2, "justification": WHY}
    refused = lab_client("admin").post(f"/reports/{rid}/extend", json=body)
    assert (refused.status_code, refused.json()["error"]["code"]) == (403, "not_decider")
    too_long = lab_client("decider").post(f"/reports/{rid}/extend", json={**body, "business_days": 4})
    assert too_long.status_code == 400
    assert lab_client("reviewer").post(f"/reports/{rid}/extend", json=body).status_code == 403
    decider = lab_client("decider")
    done = decider.post(f"/reports/{rid}/extend", json=body)
    assert done.status_code == 201, done.text
    assert datetime.fromisoformat(done.json()["new_deadline"]) == WEEKENDS.add_business_days(deadline, 2)
    missing = decider.post("/reports/rpt_missing/extend", json=body)
    assert missing.status_code == 404
    seen = http.get(f"/reports/{rid}").json()["clock"]
    assert seen["extensions"][0]["justification"] == WHY and seen["publish_by"] == done.json()["new_deadline"]
    # The delay is public before the report is: the console's public page lists it from the ledger.
    ledger.sequence(lab.db)
    page = httpx.get(f"{lab.url}/ui/public", timeout=HTTP_TIMEOUT).text
    assert rid in page and "&lt;script&gt;alert(1)&lt;/script&gt; vulnerability" in page and "<script>alert" not in page
