"""The console's evaluator "My work" page and the lab's keys, review queue and ledger status, over plain HTTP."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from airlock.access.service import create_admin_token, get_grant
from airlock.interp.models import InterpJob
from airlock.jobs import service as jobs
from airlock.jobs.models import Job
from airlock.publish import service as publish
from airlock.publish.models import Report
from tests.conftest import HTTP_TIMEOUT, Lab
from tests.console.console_helpers import csrf_of, signed_in
from tests.publish.report_fixtures import make_org

XSS = '<script>alert("x")</script>'
ESCAPED = "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;"


def _fine_tune_job(lab: Lab, grant_id: str, event: str, progress: float) -> str:
    """A running fine-tuning job with one progress event (rows only: no trainer needed)."""
    with lab.db.session() as session:
        grant = get_grant(session, grant_id)
        job = jobs.enqueue(
            session, "fine_tune", evaluator_id=grant.evaluator_id, grant_id=grant_id, params={"model": "m1/production"}
        )
        job.status, job.progress = "running", progress
        jobs.add_event(session, job.id, event)
        return job.id


def _held_interp_job(lab: Lab, grant_id: str, code: str) -> str:
    """A succeeded interp job whose result waits for the lab's review (rows only: no sandbox needed)."""
    job_id = f"ijob_{grant_id[-8:]}"
    with lab.db.session() as session:
        grant = get_grant(session, grant_id)
        session.add(
            Job(
                id=job_id,
                kind="interp",
                evaluator_id=grant.evaluator_id,
                grant_id=grant_id,
                status="succeeded",
                params={"code": code},
            )
        )
        session.flush()
        session.add(
            InterpJob(
                id=job_id,
                evaluator_id=grant.evaluator_id,
                grant_id=grant_id,
                model="m1/production",
                version_id=grant.version_ids[0],
                variant_id="var_test",
                filename="probe.py",
                entry_point="main",
                code_sha256="0" * 64,
                code_bytes=len(code),
                review_state="pending",
                review_reasons=["result exceeds the review threshold"],
            )
        )
    return job_id


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_evaluator_sees_only_their_own_jobs_results_and_reports(lab: Lab, tmp_path: Path) -> None:
    a = make_org(lab.db, tmp_path, "org-a", scopes=["sample", "finetune", "interp"])
    b = make_org(lab.db, tmp_path, "org-b", scopes=["sample", "finetune", "interp"])
    a_job = _fine_tune_job(lab, a.grant_id, f"step 3/10 {XSS}", 0.3)
    b_job = _fine_tune_job(lab, b.grant_id, "step 9/10 of org-b", 0.9)
    a_probe = _held_interp_job(lab, a.grant_id, "def main(): ...")
    a_result, b_result = a.attest(lab.db), b.attest(lab.db)
    with lab.db.session() as session:
        a_report = publish.create_report(
            session, a.principal(lab.db), "m1@v1", publish.DraftContent(title=XSS, body="Body.", result_ids=[a_result])
        ).id
        b_report = publish.create_report(
            session, b.principal(lab.db), "m1@v1", publish.DraftContent(title="org-b's", body="B.", result_ids=[])
        ).id

    assert (
        httpx.get(f"{lab.url}/ui/work", follow_redirects=False, timeout=HTTP_TIMEOUT).headers["location"]
        == "/ui/sign-in"
    )
    with signed_in(lab, a.token) as org_a:
        page = org_a.get("/ui/work")
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
        html = page.text
        # Own jobs with their progress and newest event, a held interp result, the result, the report (escaped).
        assert a_job in html and "30%" in html and f"step 3/10 {ESCAPED}" in html
        assert a_probe in html and "awaiting_review" in html
        assert a_result in html and a_report in html and ESCAPED in html and XSS not in html
        assert '<meta http-equiv="refresh"' in html  # a job is running
        # Nothing of the other organisation.
        assert b_job not in html and b_result not in html and b_report not in html and "org-b" not in html
        # Submitting the draft: refused without its CSRF token, done with it (the API's service call).
        forged = org_a.post(f"/ui/work/reports/{a_report}/submit")
        assert forged.status_code == 403
        foreign = org_a.post(f"/ui/work/reports/{b_report}/submit", data={"csrf_token": csrf_of(html)})
        assert foreign.status_code == 404
        done = org_a.post(f"/ui/work/reports/{a_report}/submit", data={"csrf_token": csrf_of(html)})
        assert done.status_code == 303, done.text
        asked = org_a.post(f"/ui/work/reports/{a_report}/request-release", data={"csrf_token": csrf_of(html)})
        assert asked.status_code == 303 and "waiting for the lab" in org_a.get("/ui/work").text
        with lab.db.session() as session:
            report_b = session.get(Report, b_report)
            assert report_b is not None and report_b.status == "draft"
            reviewer = create_admin_token(session, "rita", "reviewer")[1]
        # The lab's reviewer sees the submitted report (title escaped, the draft of org-b not at all) and agrees.
        with signed_in(lab, reviewer) as rita:
            queue = rita.get("/ui/lab/review").text
            assert a_report in queue and ESCAPED in queue and XSS not in queue and b_report not in queue
            agree = f"/ui/lab/review/reports/{a_report}/agree-release"
            assert rita.post(agree).status_code == 403
            assert rita.post(agree, data={"csrf_token": csrf_of(queue)}).status_code == 303
        assert org_a.get("/ui/lab/review", follow_redirects=False).headers["location"] == "/ui/sign-in"
        assert f'href="/public/reports/{a_report}.html"' in org_a.get("/ui/work").text
    with lab.db.session() as session:
        report_a = session.get(Report, a_report)
        assert report_a is not None and report_a.status == "published"
    with signed_in(lab, lab.admin_token) as admin:
        assert admin.get("/ui/work", follow_redirects=False).headers["location"] == "/ui/sign-in"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_lab_issues_and_revokes_keys_reviews_held_work_and_sees_the_ledger(lab: Lab) -> None:
    from airlock.config import get_settings
    from airlock.ledger import service as ledger

    grant_id, key = lab.grant("org-a", scopes=["sample", "interp"])
    job_id = _held_interp_job(lab, grant_id, f"def main():\n    return '{XSS}'")
    with lab.db.session() as session:
        reviewer = create_admin_token(session, "rita", "reviewer")[1]
        decider = create_admin_token(session, "dora", "decider")[1]
    ledger.sequence(lab.db)
    checkpoint = ledger.publish_checkpoint(lab.db, ledger.get_signer(get_settings()), force=True)

    with signed_in(lab, key) as evaluator:
        assert evaluator.get("/ui/lab/keys", follow_redirects=False).headers["location"] == "/ui/sign-in"
        assert evaluator.get("/ui/lab/review", follow_redirects=False).headers["location"] == "/ui/sign-in"
    with lab.db.session() as session:
        auditor = create_admin_token(session, "audrey", "auditor")[1]
    with signed_in(lab, auditor) as audrey:
        page = audrey.get("/ui/lab/keys").text
        assert key[:10] in page and "/keys/" not in page.replace("/ui/lab/keys", "") and "Issue a key" not in page
    with signed_in(lab, decider) as dora:
        refused = dora.get("/ui/lab/review")
        assert refused.status_code == 403 and "your role may not read the review queue" in refused.text
        assert dora.get("/ui/lab/keys").status_code == 403

    with signed_in(lab, lab.admin_token) as admin:
        home = admin.get("/ui/lab").text
        assert "Ledger status" in home and checkpoint.root_hash.hex() in home and f"{checkpoint.size} entries" in home
        page = admin.get("/ui/lab/keys").text
        assert key[:10] in page and key not in page
        csrf = csrf_of(page)
        assert admin.post(f"/ui/lab/grants/{grant_id}/keys", data={"name": "second"}).status_code == 403
        issued = admin.post(f"/ui/lab/grants/{grant_id}/keys", data={"name": "second", "csrf_token": csrf})
        assert issued.status_code == 200
        second = re.search(r"ak_[A-Za-z0-9_-]+", issued.text)
        assert second, issued.text
        models = f"{lab.url}/v1/models"
        assert (
            httpx.get(models, headers={"Authorization": f"Bearer {second[0]}"}, timeout=HTTP_TIMEOUT).status_code == 200
        )
        assert second[0] not in admin.get("/ui/lab/keys").text  # shown once
        with lab.db.session() as session:
            second_id = next(k.id for k in get_grant(session, grant_id).keys if k.name == "second")
        assert admin.post(f"/ui/lab/keys/{second_id}/revoke").status_code == 403
        assert (
            httpx.get(models, headers={"Authorization": f"Bearer {second[0]}"}, timeout=HTTP_TIMEOUT).status_code == 200
        )
        revoked = admin.post(f"/ui/lab/keys/{second_id}/revoke", data={"csrf_token": csrf})
        assert revoked.status_code == 303
        assert (
            httpx.get(models, headers={"Authorization": f"Bearer {second[0]}"}, timeout=HTTP_TIMEOUT).status_code == 401
        )
        assert httpx.get(models, headers={"Authorization": f"Bearer {key}"}, timeout=HTTP_TIMEOUT).status_code == 200
        # The admin role reads reports but not held interp results, and decides nothing.
        queue = admin.get("/ui/lab/review").text
        assert "Reports awaiting review" in queue and job_id not in queue

    with signed_in(lab, reviewer) as rita:
        keys = rita.get("/ui/lab/keys")
        assert keys.status_code == 403  # a reviewer does not read grants
        queue = rita.get("/ui/lab/review").text
        assert job_id in queue and ESCAPED in queue and XSS not in queue
        assert rita.post(f"/ui/lab/review/interp/{job_id}", data={"decision": "approve"}).status_code == 403
        denied = rita.post(f"/ui/lab/review/interp/{job_id}", data={"decision": "deny", "csrf_token": csrf_of(queue)})
        assert denied.status_code == 400 and "reason" in denied.text  # a denial needs a reason
        done = rita.post(f"/ui/lab/review/interp/{job_id}", data={"decision": "approve", "csrf_token": csrf_of(queue)})
        assert done.status_code == 303, done.text
        assert job_id not in rita.get("/ui/lab/review").text
    with lab.db.session() as session:
        row = session.get(InterpJob, job_id)
        assert row is not None and row.review_state == "approved" and row.reviewer == "rita"


def test_the_ledger_status_counts_only_configured_witnesses_that_cosigned() -> None:
    """The lab page's "k of n cosigned": a configured witness's valid line counts, an unknown key's does not."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from airlock.ledger._cosig import Cosigner, add_signature_lines
    from airlock.ledger._note import Checkpoint, Signer
    from airlock.ledger.cosign import Endpoint, cosigned_by

    signer = Signer("lab.example/ledger", Ed25519PrivateKey.generate())
    note = signer.sign(Checkpoint("lab.example/ledger", 3, bytes(32)).body())
    body = note.split("\n\n")[0] + "\n"
    w1, w2, stranger = (Cosigner(f"w.example/{i}", Ed25519PrivateKey.generate()) for i in range(3))
    endpoints = [Endpoint("http://w1", w1.verifier), Endpoint("http://w2", w2.verifier)]
    assert cosigned_by(note, endpoints) == []
    cosigned = add_signature_lines(note, [w2.cosign(body), stranger.cosign(body)])
    assert cosigned_by(cosigned, endpoints) == ["w.example/1"]
    assert cosigned_by(cosigned, []) == []
