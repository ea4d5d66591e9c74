"""The lab's console page over plain HTTP: the audit trail, and revoking a grant with its CSRF token."""

from __future__ import annotations

import re

import httpx
import pytest

from airlock.access.service import create_admin_token
from tests.conftest import HTTP_TIMEOUT, Lab
from tests.console.console_helpers import signed_in


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_evaluator_sees_their_grant_and_quota_left(lab: Lab) -> None:
    grant_id, key = lab.grant("org-a", scopes=["sample", "redteam"], quota_total_tokens=5000)
    with signed_in(lab, key) as evaluator:
        page = evaluator.get("/ui/redteam").text
    section = page[page.index("My grant") :][:900]
    assert grant_id in section and "redteam, sample" in section, section
    assert "0 used, 5000 of 5000 left" in section and "m1@v1/production" in section


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_lab_reads_the_audit_trail_and_revokes_a_grant(lab: Lab) -> None:
    grant_id, key = lab.grant("org-<b>a</b>", scopes=["sample"])
    assert (
        httpx.get(f"{lab.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=HTTP_TIMEOUT).status_code
        == 200
    )
    with lab.db.session() as session:
        auditor = create_admin_token(session, "audrey", "auditor")[1]
    with signed_in(lab, auditor) as audrey:
        page = audrey.get("/ui/lab").text
        # The evaluator's request is in the trail; the auditor may read it but not revoke.
        assert "GET /v1/models" in page and "org-&lt;b&gt;a&lt;/b&gt;" in page and "org-<b>" not in page
        assert f"/ui/lab/grants/{grant_id}/revoke" not in page
    with signed_in(lab, lab.admin_token) as admin:
        page = admin.get("/ui/lab").text
        assert f'action="/ui/lab/grants/{grant_id}/revoke"' in page
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert csrf
        forged = admin.post(f"/ui/lab/grants/{grant_id}/revoke", data={"reason": "no token"})
        assert forged.status_code == 403
        assert (
            httpx.get(
                f"{lab.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=HTTP_TIMEOUT
            ).status_code
            == 200
        )
        done = admin.post(f"/ui/lab/grants/{grant_id}/revoke", data={"reason": "window closed", "csrf_token": csrf[1]})
        assert done.status_code == 303 and done.headers["location"] == "/ui/lab#grants"
        assert (
            httpx.get(
                f"{lab.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=HTTP_TIMEOUT
            ).status_code
            == 401
        )
        filtered = admin.get("/ui/lab", params={"audit_grant": grant_id}).text
        assert "revoked" in filtered and "401" in filtered
        again = admin.post(f"/ui/lab/grants/{grant_id}/revoke", data={"csrf_token": csrf[1]})
        assert again.status_code == 409 and "already revoked" in again.text
