"""The console in a real browser (Debian's chromium through Playwright) and its security checks over HTTP.

One lab serves the whole module. The scenario: the lab issues a grant, the red-teamer chats side by
side and flags a critical finding, the gate blocks, a reviewer triages, the public table shows it.
Screenshots of each page land in ``.cache/screenshots`` (``AIRLOCK_SCREENSHOTS`` overrides).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FAKE_MANIFEST, HTTP_TIMEOUT, REPO, Lab, sqlite_lab
from tests.governance.gate_helpers import write_policy

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"),
]
SHOTS = Path(os.environ.get("AIRLOCK_SCREENSHOTS", REPO / ".cache" / "screenshots"))
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def console_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One lab, with a policy, for the whole module."""
    from airlock.config import reset_settings

    directory = tmp_path_factory.mktemp("console")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRLOCK_HOME", str(directory / "home"))
        patch.setenv("AIRLOCK_POLICY", str(write_policy(directory / "policy.yaml")))
        for var in ("AIRLOCK_DATABASE_URL", "AIRLOCK_MANIFEST", "AIRLOCK_REDIS_URL"):
            patch.delenv(var, raising=False)
        reset_settings()
        with sqlite_lab(directory, FAKE_MANIFEST) as lab:
            yield lab
        reset_settings()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield instance
        instance.close()


def _token(lab: Lab, role: str) -> str:
    from airlock.access.service import create_admin_token

    with lab.db.session() as session:
        return create_admin_token(session, f"{role}-console", role)[1]


def _sign_in(browser: Any, lab: Lab, secret: str, width: int = 1280, height: int = 800) -> Any:
    page = browser.new_context(viewport={"width": width, "height": height}).new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(f"{lab.url}/ui/sign-in")
    page.get_by_label("Key or token").fill(secret)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state()
    return page


def _shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_lab_grant_redteam_finding_gate_triage_public(console_lab: Lab, browser: Any) -> None:
    lab = console_lab
    xss: list[str] = []

    # The lab issues a red-teaming grant and its key from the console.
    admin = _sign_in(browser, lab, lab.admin_token)
    assert admin.url.endswith("/ui/lab")
    admin.get_by_label("Evaluator organisation").fill("Red Org")
    admin.get_by_label("Variants (space-separated)").fill("production helpful-only")
    admin.get_by_label("Key name (the red-teamer)").fill("alice")
    admin.get_by_role("button", name="Issue grant").click()
    key = admin.get_by_label("API key").input_value()
    assert key.startswith("ak_")
    _shot(admin, "lab-key-issued")

    # The red-teamer signs in, opens a side-by-side session and chats; the answer streams in as text.
    rt = _sign_in(browser, lab, key)
    rt.on("dialog", lambda d: (xss.append(d.message), d.dismiss()))
    assert rt.url.endswith("/ui/redteam")
    assert "Hours left: 10.00" in rt.inner_text("#hours")
    # Transcripts are kept (retention_redteam=full): until the red-teamer accepts the terms, the page says so.
    rt.get_by_label("Model", exact=True).select_option("m1@v1/production")
    rt.get_by_role("button", name="Start session").click()
    rt.wait_for_selector("text=airlock grant accept")
    assert "retention_redteam=full" in rt.content()
    _shot(rt, "redteam-terms-not-accepted")
    lab.accept_terms(key)  # the red-teamer's `airlock grant accept`
    rt.goto(f"{lab.url}/ui/redteam")
    rt.get_by_label("Title (optional)").fill("filter probe <b>bold</b>")
    rt.get_by_label("Model", exact=True).select_option("m1@v1/production")
    rt.get_by_label("Side by side with (optional)").select_option("m1@v1/helpful-only")
    rt.get_by_role("button", name="Start session").click()
    rt.wait_for_url(re.compile(r"/ui/redteam/sessions/rts_"))
    payload = "<script>alert('xss')</script><img src=x onerror=alert(1)> tell me"
    rt.get_by_label("Prompt (sent to both variants)").fill(payload)
    rt.get_by_role("button", name="Send").click()
    rt.wait_for_selector("article[aria-label='Turn 0']")
    assert rt.locator("article[aria-label='Turn 0'] .answer").count() == 2
    answer = rt.locator("section[aria-label='helpful-only answer'] pre.content").inner_text()
    assert "<script>alert('xss')</script>" in answer  # shown as text, not run
    assert rt.locator("h1").inner_text() == "filter probe <b>bold</b>"
    production = rt.locator("section[aria-label='production answer']")
    production.get_by_text("Flag a finding").click()
    production.get_by_label("Category").select_option("bio")
    production.get_by_label("Severity").select_option("critical")
    production.get_by_label("Title").fill("Synthesis route given")
    production.get_by_label("Reproduction notes").fill("Ask twice, then rephrase.")
    production.get_by_role("button", name="Flag finding").click()
    rt.wait_for_selector("#findings li")
    assert "critical" in rt.inner_text("#findings")
    _shot(rt, "redteam-session")
    rt.set_viewport_size({"width": 390, "height": 844})
    _shot(rt, "redteam-session-390")
    assert xss == []

    # The gate blocks on the finding; a reviewer (not the grant's issuer) disputes it with a reason.
    reviewer = _sign_in(browser, lab, _token(lab, "reviewer"))
    gate = reviewer.inner_text("#gate")
    finding_id = re.search(r"rtf_\w+", gate)
    assert finding_id is not None and "block" in gate
    _shot(reviewer, "lab-gate-and-findings")
    row = reviewer.locator("#findings tr", has_text="Synthesis route given")
    row.get_by_label("Decision").select_option("disputed")
    row.get_by_label("Reason (needed to dispute)").fill("the route is in every textbook")
    row.get_by_role("button", name="Triage").click()
    reviewer.wait_for_selector("#findings")
    assert finding_id.group(0) not in reviewer.inner_text("#gate")
    assert "disputed" in reviewer.inner_text("#findings")

    # The public page (no sign-in) shows the access and the finding by severity, from the ledger.
    from airlock.ledger import service as ledger

    ledger.sequence(lab.db)
    public = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
    public.goto(f"{lab.url}/ui/public")
    table = public.inner_text("main")
    assert "Red Org" in table and "1 critical" in table
    _shot(public, "public-record")
    public.goto(f"{lab.url}/docs")
    public.wait_for_selector(".swagger-ui .info", timeout=WAIT_MS)
    _shot(public, "api-docs-offline")


def test_forms_need_their_csrf_token_and_revocation_ends_sessions(console_lab: Lab) -> None:
    lab = console_lab
    _gid, key = lab.grant("csrf-org", scopes=["redteam"])
    with httpx.Client(base_url=lab.url, follow_redirects=False, timeout=HTTP_TIMEOUT) as client:
        # Sign-in itself needs the token its page set.
        refused = client.post("/ui/sign-in", data={"credential": key})
        assert refused.status_code == 403 and "security token" in refused.text
        page = client.get("/ui/sign-in")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token is not None
        signed = client.post("/ui/sign-in", data={"credential": key, "csrf_token": token.group(1)})
        assert signed.status_code == 303
        cookie = signed.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        home = client.get("/ui/redteam")
        assert home.status_code == 200
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', home.text)
        assert csrf is not None
        forged = client.post("/ui/redteam/sessions", data={"model_a": "m1/production"})
        assert forged.status_code == 403 and "security token" in forged.text
        wrong = client.post("/ui/redteam/sessions", data={"model_a": "m1/production", "csrf_token": "x" * 43})
        assert wrong.status_code == 403
        # Transcripts are kept (retention_redteam=full): the page says why and how to accept the terms first.
        unaccepted = client.post("/ui/redteam/sessions", data={"model_a": "m1/production", "csrf_token": csrf.group(1)})
        assert unaccepted.status_code == 403 and "airlock grant accept" in unaccepted.text
        assert "retention_redteam=full" in unaccepted.text
        lab.accept_terms(key)
        made = client.post("/ui/redteam/sessions", data={"model_a": "m1/production", "csrf_token": csrf.group(1)})
        assert made.status_code == 303

        # Revoking the key ends the console session on its next request.
        from airlock.access.models import ApiKey
        from airlock.access.service import hash_secret, revoke_api_key

        with lab.db.session() as session:
            row = session.query(ApiKey).filter_by(key_hash=hash_secret(key)).one()
            revoke_api_key(session, row.id)
        gone = client.get("/ui/redteam")
        assert gone.status_code == 303 and gone.headers["location"] == "/ui/sign-in"


def test_organisations_and_red_teamers_do_not_see_each_other(console_lab: Lab) -> None:
    lab = console_lab
    _g1, alice = lab.grant("iso-a", scopes=["redteam"])
    _g2, mallory = lab.grant("iso-b", scopes=["redteam"])
    lab.accept_terms(alice)
    with httpx.Client(base_url=lab.url, timeout=HTTP_TIMEOUT) as api:
        sid = api.post(
            "/v1/airlock/redteam/sessions",
            json={"models": ["m1/production"], "title": "alice's secret"},
            headers={"Authorization": f"Bearer {alice}"},
        ).json()["id"]
    with httpx.Client(base_url=lab.url, follow_redirects=False, timeout=HTTP_TIMEOUT) as client:
        token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/ui/sign-in").text)
        assert token is not None
        client.post("/ui/sign-in", data={"credential": mallory, "csrf_token": token.group(1)})
        assert "alice's secret" not in client.get("/ui/redteam").text
        other = client.get(f"/ui/redteam/sessions/{sid}")
        assert other.status_code == 404 and "does not exist" in other.text
        assert client.get("/ui/lab").status_code == 303  # an evaluator is not the lab
