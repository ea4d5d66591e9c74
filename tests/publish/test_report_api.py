"""Reports over real HTTP: evaluator drafting, lab review, early release, public pages, reveal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from airlock.access.service import create_admin_token
from airlock.evals.attestation import verify
from airlock.publish import redaction
from airlock.publish.service import MAX_PLOT_BYTES, verify_public_report
from tests.conftest import HTTP_TIMEOUT, Lab
from tests.publish.report_fixtures import make_org, tiny_png

BODY = (
    "# Proxy uplift\n\nSee plot. [[redact:hazard detail]]Step 3 uses the zyloxin proxy.[[/redact]]\n\n"
    "<script>alert(1)</script> [click](javascript:alert(1))\n"
)


def evaluator(lab: Lab, tmp_path: Path, name: str = "org-a", **grant: Any) -> tuple[httpx.Client, str]:
    """A client for a new grant of ``name`` with a registered signing key and one attested result."""
    # Set up through the services: the shared SessionDep commits after the response is sent, so
    # an HTTP setup step could still be uncommitted when the next request reads it.
    org = make_org(lab.db, tmp_path, name, **grant)
    result_id = org.attest(lab.db)
    http = httpx.Client(
        base_url=lab.url + "/v1/airlock", headers={"Authorization": f"Bearer {org.token}"}, timeout=HTTP_TIMEOUT
    )
    return http, result_id


def admin(lab: Lab, role: str = "reviewer") -> httpx.Client:
    with lab.db.session() as session:
        _row, token = create_admin_token(session, f"lab-{role}", role)
    return httpx.Client(
        base_url=lab.url + "/v1/airlock/admin", headers={"Authorization": f"Bearer {token}"}, timeout=HTTP_TIMEOUT
    )


def error(resp: httpx.Response) -> tuple[int, str | None]:
    return resp.status_code, resp.json()["error"]["code"]


def test_full_publication_flow(lab: Lab, tmp_path: Path) -> None:
    http, result_id = evaluator(lab, tmp_path, embargo_days=30)
    public = httpx.Client(base_url=lab.url, timeout=HTTP_TIMEOUT)

    plot = http.post("/reports/attachments", files={"file": ("uplift.png", tiny_png(), "image/png")})
    assert plot.status_code == 201, plot.text
    plot_id = plot.json()["id"]
    created = http.post(
        "/reports",
        json={
            "model": "m1@v1",
            "title": "Proxy uplift",
            "body": BODY,
            "result_ids": [result_id],
            "attachment_ids": [plot_id],
        },
    )
    assert created.status_code == 201, created.text
    report = created.json()
    rid = report["id"]
    assert report["status"] == "draft" and report["revision"] == 1 and report["body"] == BODY
    assert report["redactions"][0]["text"] == "Step 3 uses the zyloxin proxy."
    assert "zyloxin" not in report["public_body"]
    assert report["embargo"]["ends_at"] is None  # m1@v1 is not deployed

    reviewer = admin(lab)
    assert reviewer.get(f"/reports/{rid}").status_code == 404  # drafts are the evaluator's alone
    assert public.get(f"/public/reports/{rid}").status_code == 404

    assert http.post(f"/reports/{rid}/submit").json()["status"] == "submitted"
    assert error(http.post(f"/reports/{rid}/submit")) == (409, "report_submitted")
    listed = reviewer.get("/reports").json()
    assert [r["id"] for r in listed] == [rid]
    seen = reviewer.get(f"/reports/{rid}").json()
    assert "zyloxin" not in str(seen) and seen["redactions"][0]["salt"] is None
    comment = reviewer.post(f"/reports/{rid}/comments", json={"body": "The lab reads the elicitation differently."})
    assert comment.status_code == 201
    assert reviewer.post(f"/reports/{rid}/agree-release").json()["status"] == "submitted"
    assert public.get(f"/public/reports/{rid}").status_code == 404
    assert http.post(f"/reports/{rid}/request-release").json()["status"] == "published"

    listing = public.get("/public/reports").json()
    assert [r["id"] for r in listing] == [rid] and listing[0]["url"] == f"/public/reports/{rid}"
    page = public.get(f"/public/reports/{rid}").json()
    assert page["published_reason"] == "agreement" and page["title"] == "Proxy uplift"
    assert "zyloxin" not in str(page)
    assert page["lab_comments"][0]["body"] == "The lab reads the elicitation differently."
    assert page["lab_comments"][0]["author"] == "lab-reviewer"
    (res,) = page["results"]
    assert res["id"] == result_id and res["signature_valid"]
    assert verify(res["attestation"], res["signature"], res["public_key"])  # checkable offline
    # In this test the evaluator's key is the one the page shows; a real reader pins it from the evaluator.
    pinned = [res["public_key"]]
    assert verify_public_report(page, pinned).ok
    assert not verify_public_report(page, None).ok  # fail closed without a pinned key
    md = public.get(f"/public/reports/{rid}.md")
    assert md.headers["content-type"].startswith("text/markdown") and "Lab comments" in md.text
    png = public.get(f"/public/reports/{rid}/attachments/{plot_id}")
    assert png.content == tiny_png() and png.headers["content-type"] == "image/png"
    assert public.get(f"/public/reports/{rid}/attachments/ratt_other").status_code == 404

    revealed = http.post(f"/reports/{rid}/reveal", json={"redaction": 1})
    assert revealed.status_code == 200, revealed.text
    page = public.get(f"/public/reports/{rid}").json()
    (span,) = page["redactions"]
    assert span["revealed"] and span["text"] == "Step 3 uses the zyloxin proxy."
    assert redaction.verify_commitment(span["commitment"], span["salt"], span["text"])
    assert "Step 3 uses the zyloxin proxy.[[revealed #1" in page["body_revealed"]
    assert page["body"] == page["document"]["body"]  # the hashed text never changes
    check = verify_public_report(page, pinned)
    assert check.ok and check.revealed == 1
    html = public.get(f"/public/reports/{rid}.html")
    assert html.status_code == 200 and "default-src 'none'" in html.headers["content-security-policy"]
    assert '<mark class="revealed"' in html.text and "Step 3 uses the zyloxin proxy." in html.text
    assert "<script>alert" not in html.text and 'href="javascript' not in html.text
    assert f'<img src="/public/reports/{rid}/attachments/{plot_id}"' in html.text
    assert public.get("/public/reports/rpt_nope.html").status_code == 404
    tampered = {**page, "redactions": [{**span, "text": "something else"}]}
    assert not verify_public_report(tampered, pinned).ok
    assert not verify_public_report({**page, "content_hash": "0" * 64}, pinned).ok


def test_bad_requests_are_clear_4xx(lab: Lab, tmp_path: Path) -> None:
    http, result_id = evaluator(lab, tmp_path)
    other, their_result = evaluator(lab, tmp_path, "org-b")

    def create(**overrides: Any) -> httpx.Response:
        body = {"model": "m1@v1", "title": "t", "body": "b", "result_ids": [result_id], **overrides}
        return http.post("/reports", json=body)

    assert error(create(result_ids=["res_missing"])) == (404, "result_not_found")
    assert error(create(result_ids=[their_result])) == (404, "result_not_found")
    assert error(create(body="[[redact:x]]unclosed")) == (400, "malformed_redaction")
    assert error(create(model="m2@v1")) == (403, "version_not_granted")
    assert create(unknown_field=1).status_code == 400
    assert create(title="").status_code == 400
    assert http.get("/reports").json() == []  # nothing half-written

    not_png = http.post("/reports/attachments", files={"file": ("x.png", b"GIF89a" + b"0" * 100, "image/png")})
    assert error(not_png) == (400, "unsupported_file_type")
    big = tiny_png() + b"\0" * MAX_PLOT_BYTES
    assert error(http.post("/reports/attachments", files={"file": ("big.png", big, "image/png")})) == (
        400,
        "file_too_large",
    )
    their_plot = other.post("/reports/attachments", files={"file": ("p.png", tiny_png(), "image/png")}).json()["id"]
    assert error(create(attachment_ids=[their_plot])) == (404, "attachment_not_found")

    rid = create().json()["id"]
    assert error(other.get(f"/reports/{rid}")) == (404, "report_not_found")
    assert error(other.patch(f"/reports/{rid}", json={"title": "x"})) == (404, "report_not_found")
    assert error(http.patch(f"/reports/{rid}", json={})) == (400, None)
    assert error(http.post(f"/reports/{rid}/reveal", json={"redaction": 1})) == (409, "report_not_published")
    assert httpx.get(lab.url + "/v1/airlock/reports", timeout=HTTP_TIMEOUT).status_code == 401

    http.post(f"/reports/{rid}/submit")
    decider = admin(lab, "decider")
    assert error(decider.get("/reports")) == (403, "role_not_allowed")
    assert error(admin(lab).post(f"/reports/{rid}/comments", json={"body": ""}))[0] == 400


@pytest.mark.parametrize("role", ["admin", "reviewer", "auditor"])
def test_lab_roles_can_read_reports(lab: Lab, tmp_path: Path, role: str) -> None:
    http, result_id = evaluator(lab, tmp_path)
    rid = http.post("/reports", json={"model": "m1@v1", "title": "t", "body": "b", "result_ids": [result_id]}).json()
    http.post(f"/reports/{rid['id']}/submit")
    assert admin(lab, role).get(f"/reports/{rid['id']}").status_code == 200


def test_published_report_names_its_ledger_entry(lab: Lab, tmp_path: Path) -> None:
    import json

    from airlock.ledger import service as ledger

    sequence = getattr(ledger, "sequence", None)
    if sequence is None:
        pytest.skip("the ledger has no sequencer yet")
    http, result_id = evaluator(lab, tmp_path)
    rid = http.post("/reports", json={"model": "m1@v1", "title": "t", "body": "b", "result_ids": [result_id]}).json()[
        "id"
    ]
    http.post(f"/reports/{rid}/submit")
    admin(lab).post(f"/reports/{rid}/agree-release")
    http.post(f"/reports/{rid}/request-release")
    sequence(lab.db)  # the gateway's sequencer may have integrated it already; this makes sure
    page = httpx.get(f"{lab.url}/public/reports/{rid}", timeout=HTTP_TIMEOUT).json()
    assert isinstance(page["ledger_index"], int)
    with lab.db.session() as session:
        (entry,) = ledger.get_entries(session, page["ledger_index"], page["ledger_index"] + 1)
        body = json.loads(entry.entry)["body"]
    assert body["report_id"] == rid and body["content_hash"] == page["content_hash"]
