"""Retention terms: the section, and a canary sent through each capability under ``none`` found nowhere after."""

from __future__ import annotations

import io
import json
import logging
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from airlock.access import terms
from airlock.access.retention import RetentionTerms, keeps_content
from airlock.config import get_settings
from tests.conftest import HTTP_TIMEOUT, Lab, needs_bwrap, single_variant_manifest, sqlite_lab

CANARY = "CANARY-7f3e9b1c-retention"


def test_retention_section_defaults_validation_and_ledger() -> None:
    defaults = terms.term_defaults()
    assert defaults["retention_finetune"] == "none" and defaults["retention_interp"] == "none"
    assert defaults["retention_evals"] == "none" and defaults["retention_redteam"] == "full"
    assert terms.validate_terms({"retention": {"retention_finetune": "full"}}) == {"retention_finetune": "full"}
    with pytest.raises(terms.TermsError) as bad:
        terms.validate_terms({"retention_interp": "keep"})
    assert bad.value.param == "terms.retention_interp"
    assert terms.validate_terms({"retention_finetune": "sealed"}) == {"retention_finetune": "sealed"}
    assert set(RetentionTerms.public_terms) == set(RetentionTerms.model_fields)
    assert keeps_content(None, "retention_redteam") is False  # no grant keeps nothing


def _grep(root: Path, needle: bytes) -> list[str]:
    """Return every file under ``root`` whose bytes contain ``needle`` (the SQLite file and its WAL included)."""
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _dump(db_file: Path) -> str:
    """Return the SQL text dump of a SQLite database (what a backup would hold), after a truncating checkpoint.

    Until a checkpoint, SQLite's write-ahead log still holds the frames of rows since rewritten;
    the checkpoint moves the current pages into the file (zeroed where deleted: secure_delete) and
    empties the log, which is what the grep of the file and the directory then looks at.
    """
    with sqlite3.connect(db_file) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return "\n".join(conn.iterdump())


@pytest.fixture
def ft_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Path]]:
    directory = tmp_path_factory.mktemp("retention")
    with sqlite_lab(directory, single_variant_manifest("tiny", "tiny-random")) as lab:
        yield lab, directory


def _finetune(lab: Lab, key: str, canary: str) -> tuple[openai.OpenAI, str]:
    client = openai.OpenAI(base_url=lab.url + "/v1", api_key=key, max_retries=0)
    lines = [
        {"messages": [{"role": "user", "content": f"{canary} {i}"}, {"role": "assistant", "content": canary}]}
        for i in range(4)
    ]
    data = "\n".join(json.dumps(e) for e in lines).encode()
    file_id = client.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model="tiny/helpful-only", training_file=file_id, hyperparameters={"n_epochs": 1, "batch_size": 2}, seed=1
    )
    for _ in range(600):
        done = client.fine_tuning.jobs.retrieve(job.id)
        if done.status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.2)
    assert done.status == "succeeded", done.error
    return client, file_id


def test_canary_under_none_is_gone_and_kept_under_full(
    ft_lab: tuple[Lab, Path], caplog: pytest.LogCaptureFixture
) -> None:
    lab, directory = ft_lab
    caplog.set_level(logging.DEBUG)
    _gid, key = lab.grant("org-a", model="tiny", variants=["helpful-only"], scopes=["sample", "finetune"])
    client, file_id = _finetune(lab, key, CANARY)
    # Metadata stays: size, hash and example count; the content is gone for everyone, the lab included.
    meta = client.files.retrieve(file_id)
    assert meta.bytes > 0
    with pytest.raises(openai.NotFoundError):
        client.files.content(file_id)
    lab.server.flush_audit()
    home = get_settings().artifacts_dir
    needle = CANARY.encode()
    assert CANARY not in _dump(directory / "airlock.db")
    assert _grep(home, needle) == [] and _grep(directory, needle) == []
    assert CANARY not in caplog.text

    # Under "full" the same path keeps the file: enforcement follows the agreed term, not a blanket wipe.
    kept = CANARY + "-full"
    _gid, key = lab.grant(
        "org-b", model="tiny", variants=["helpful-only"], scopes=["sample", "finetune"], retention_finetune="full"
    )
    lab.accept_terms(key)  # the lab keeps content only on terms the evaluator signed
    client, file_id = _finetune(lab, key, kept)
    assert kept.encode() in client.files.content(file_id).read()
    assert _grep(home, kept.encode()), "the grep finds content the terms let the lab keep"
    from airlock.access import service
    from airlock.access.events import grant_issued_event

    with lab.db.session() as session:
        body, _confidential = grant_issued_event(session, service.get_grant(session, _gid))
    assert body["retention_finetune"] == "full" and body["retention_redteam"] == "full"
    assert body["retention_interp"] == "none"


INTERP_CODE = f"""
# {CANARY}
def main(secret):
    print(secret)
    return {{"echo": secret}}
"""


@pytest.fixture
def interp_lab(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Lab, Path]]:
    from airlock.config import reset_settings
    from tests.interp.test_interp_api import MANIFEST

    monkeypatch.setenv("AIRLOCK_INTERP_WALL_TIMEOUT_S", "60")
    reset_settings()
    directory = tmp_path_factory.mktemp("retention-interp")
    with sqlite_lab(directory, MANIFEST) as lab:
        yield lab, directory


@needs_bwrap
def test_interp_canary_is_gone_once_the_result_is_fetched(
    interp_lab: tuple[Lab, Path], caplog: pytest.LogCaptureFixture
) -> None:
    from tests.interp.test_interp_api import _wait

    lab, directory = interp_lab
    caplog.set_level(logging.DEBUG)
    _gid, key = lab.grant(model="tiny", variants=["helpful-only"], scopes=["interp"])
    with httpx.Client(base_url=lab.url, headers={"Authorization": f"Bearer {key}"}, timeout=HTTP_TIMEOUT) as http:
        body = {"model": "tiny/helpful-only", "code": INTERP_CODE, "args": {"secret": CANARY}}
        created = http.post("/v1/airlock/interp/jobs", json=body)
        assert created.status_code == 200, created.text
        job_id = created.json()["id"]
        done = _wait(http, job_id, until=("succeeded", "failed"))
        assert done["status"] == "succeeded", done
        # The evaluator still reads its logs and result until it has fetched the arrays, the last read.
        assert CANARY in done["logs"]
        result = http.get(f"/v1/airlock/interp/jobs/{job_id}/result")
        assert result.json()["value"]["echo"] == CANARY
        assert http.get(result.json()["npz_path"]).status_code == 200
        again = http.get(f"/v1/airlock/interp/jobs/{job_id}/result")
        assert again.status_code == 409 and again.json()["error"]["code"] == "result_missing"
        after = http.get(f"/v1/airlock/interp/jobs/{job_id}").json()
        assert after["logs"] == "" and len(after["code_sha256"]) == 64 and after["result_bytes"] > 0
    lab.server.flush_audit()
    needle = CANARY.encode()
    assert CANARY not in _dump(directory / "airlock.db")
    assert _grep(get_settings().artifacts_dir, needle) == [] and _grep(directory, needle) == []
    assert CANARY not in caplog.text


FAILING_CODE = f"""
def main(secret):
    print(secret)
    raise ValueError("{CANARY}-raised " + secret)
"""


@needs_bwrap
def test_interp_failed_and_never_fetched_jobs_leave_no_content(
    interp_lab: tuple[Lab, Path], caplog: pytest.LogCaptureFixture
) -> None:
    from datetime import timedelta

    from airlock.db import utcnow
    from airlock.interp.service import UnfetchedSweeper, job_dir
    from tests.interp.test_interp_api import _wait

    lab, directory = interp_lab
    caplog.set_level(logging.DEBUG)
    _gid, key = lab.grant(model="tiny", variants=["helpful-only"], scopes=["interp"])
    with httpx.Client(base_url=lab.url, headers={"Authorization": f"Bearer {key}"}, timeout=HTTP_TIMEOUT) as http:
        failing = {"model": "tiny/helpful-only", "code": FAILING_CODE, "args": {"secret": CANARY}}
        failed_id = http.post("/v1/airlock/interp/jobs", json=failing).json()["id"]
        failed = _wait(http, failed_id, until=("succeeded", "failed"))
        # A failed job keeps neither what it printed nor what it raised once it ends; its error code stays.
        assert failed["status"] == "failed" and failed["logs"] == "", failed
        assert CANARY not in json.dumps(failed) and failed["error"]["code"]
        assert "not kept readable" in failed["error"]["message"]
        events = http.get(f"/v1/airlock/interp/jobs/{failed_id}/events").text
        assert CANARY not in events
        body = {"model": "tiny/helpful-only", "code": INTERP_CODE, "args": {"secret": CANARY}}
        kept_id = http.post("/v1/airlock/interp/jobs", json=body).json()["id"]
        assert _wait(http, kept_id, until=("succeeded", "failed"))["status"] == "succeeded"
        # Never fetched: within its time to live the result waits; after it the sweeper drops it.
        settings = get_settings()
        sweeper = UnfetchedSweeper(lab.db, settings)
        assert sweeper.run_once() == []
        assert job_dir(settings.artifacts_dir, kept_id).exists()
        later = UnfetchedSweeper(
            lab.db, settings, clock=lambda: utcnow() + timedelta(seconds=settings.interp_result_ttl_s + 1)
        )
        assert kept_id in later.run_once()
        assert not job_dir(settings.artifacts_dir, kept_id).exists()
        gone = http.get(f"/v1/airlock/interp/jobs/{kept_id}/result")
        assert gone.status_code == 409 and gone.json()["error"]["code"] == "result_missing"
        assert http.get(f"/v1/airlock/interp/jobs/{kept_id}").json()["logs"] == ""
        assert later.run_once() == []  # nothing left to sweep
    lab.server.flush_audit()
    needle = CANARY.encode()
    assert CANARY not in _dump(directory / "airlock.db")
    assert _grep(get_settings().artifacts_dir, needle) == [] and _grep(directory, needle) == []
    assert CANARY not in caplog.text


def test_sampling_and_redteam_transcripts_under_none_leave_no_content(
    tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.conftest import FAKE_MANIFEST

    caplog.set_level(logging.DEBUG)
    directory = tmp_path_factory.mktemp("retention-redteam")
    with sqlite_lab(directory, FAKE_MANIFEST) as lab:
        _gid, key = lab.grant("org-a", scopes=["sample", "redteam"], retention_redteam="none")
        sampler = openai.OpenAI(base_url=lab.url + "/v1", api_key=key, max_retries=0)
        reply = sampler.chat.completions.create(
            model="m1/helpful-only", messages=[{"role": "user", "content": CANARY}], max_tokens=8
        )
        assert reply.usage is not None and reply.usage.prompt_tokens > 0  # the audit keeps counts, not words
        with pytest.raises(openai.BadRequestError) as refused:  # an error names the field, never echoes the input
            sampler.chat.completions.create(
                model="m1/helpful-only", messages=[{"role": "wizard", "content": CANARY}], max_tokens=8
            )
        assert CANARY not in str(refused.value)
        with httpx.Client(base_url=lab.url, headers={"Authorization": f"Bearer {key}"}, timeout=HTTP_TIMEOUT) as rt:
            sid = rt.post("/v1/airlock/redteam/sessions", json={"models": ["m1/helpful-only"]}).json()["id"]
            turn = rt.post(f"/v1/airlock/redteam/sessions/{sid}/turns", json={"content": f"say {CANARY}"})
            assert turn.status_code == 201 and CANARY in turn.json()["responses"][0]["content"]
            assert rt.post(f"/v1/airlock/redteam/sessions/{sid}/close").status_code == 200
            kept = rt.get(f"/v1/airlock/redteam/sessions/{sid}").json()
        # Counts and verdicts stay; the words are gone.
        assert kept["turns"] == 1 and kept["transcript"][0]["prompt"] == ""
        assert kept["transcript"][0]["responses"][0]["content"] == ""
        lab.server.flush_audit()
        assert CANARY not in _dump(directory / "airlock.db")
        assert _grep(directory, CANARY.encode()) == [] and _grep(get_settings().artifacts_dir, CANARY.encode()) == []
    assert CANARY not in caplog.text


def _database_dump(db_url: str) -> str:
    """Return what a backup of the database would hold: ``pg_dump`` for PostgreSQL, the SQL dump for SQLite."""
    if db_url.startswith("sqlite:///"):
        return _dump(Path(db_url.removeprefix("sqlite:///")))
    dumped = subprocess.run(["pg_dump", "--data-only", db_url], capture_output=True, text=True, timeout=60, check=True)
    return dumped.stdout


def test_redteam_words_leave_no_trace_in_a_database_dump(db: Any, db_url: str) -> None:
    """On either database, what ``none`` drops is absent from a dump (the ledger's commitment openings included)."""
    from tests.conftest import FAKE_MANIFEST, running_lab

    with running_lab(db, FAKE_MANIFEST) as lab:
        _gid, key = lab.grant("org-a", scopes=["sample", "redteam"], retention_redteam="none")
        with httpx.Client(base_url=lab.url, headers={"Authorization": f"Bearer {key}"}, timeout=HTTP_TIMEOUT) as rt:
            sid = rt.post("/v1/airlock/redteam/sessions", json={"models": ["m1/helpful-only"]}).json()["id"]
            assert rt.post(f"/v1/airlock/redteam/sessions/{sid}/turns", json={"content": CANARY}).status_code == 201
            assert CANARY in _database_dump(db_url)  # the open session keeps its transcript: the dump can see it
            assert rt.post(f"/v1/airlock/redteam/sessions/{sid}/close").status_code == 200
        lab.server.flush_audit()
        assert CANARY not in _database_dump(db_url)


# ---------------------------------------------------------------- sealed


def _accept(lab: Lab, grant_id: str, key: str) -> Any:
    """Accept the key's grant's terms as its evaluator (signing key registered, a new seal key); return the seal key."""
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from nacl.public import PrivateKey

    from airlock.access import acceptance
    from airlock.canonical import canonical_bytes, iso_utc
    from airlock.db import utcnow
    from airlock.evals.attestation import fingerprint, public_key_b64

    signing, seal = Ed25519PrivateKey.generate(), PrivateKey.generate()
    with httpx.Client(base_url=lab.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        registered = http.post("/v1/airlock/signing-keys", json={"public_key": public_key_b64(signing)})
        assert registered.status_code in (201, 409), registered.text
        digest = http.get("/v1/airlock/grant/terms").json()["terms_sha256"]
        seal_b64, accepted_at = base64.b64encode(bytes(seal.public_key)).decode(), iso_utc(utcnow())
        document = acceptance.acceptance_document(grant_id, digest, seal_b64, accepted_at)
        accepted = http.post(
            "/v1/airlock/grant/accept",
            json={
                "terms_sha256": digest,
                "seal_public_key": seal_b64,
                "accepted_at": accepted_at,
                "signature": base64.b64encode(signing.sign(canonical_bytes(document))).decode(),
                "key_fingerprint": fingerprint(public_key_b64(signing)),
            },
        )
        assert accepted.status_code in (200, 201), accepted.text
    return seal


def _open_all(http: httpx.Client, key: Any) -> dict[str, bytes]:
    """Return every item sealed under the caller's grant, opened with ``key``, by kind (the evaluator's view)."""
    from nacl.public import SealedBox

    opened: dict[str, bytes] = {}
    for item in http.get("/v1/airlock/sealed").json():
        box = http.get(f"/v1/airlock/sealed/{item['id']}/ciphertext")
        assert box.status_code == 200 and box.headers["content-type"] == "application/octet-stream"
        opened[item["kind"]] = SealedBox(key).decrypt(box.content)
    return opened


def _release(lab: Lab, http: httpx.Client, item: dict[str, Any], plaintext: bytes) -> None:
    """Release ``item``: wrong content first (400, nothing changes), then the right one; the lab then reads it."""
    import base64

    from airlock.ledger import service as ledger

    admin = {"Authorization": f"Bearer {lab.admin_token}"}
    url = f"/v1/airlock/admin/sealed/{item['id']}/content"
    still = http.get(url, headers=admin)
    assert still.status_code == 409 and still.json()["error"]["code"] == "sealed_item_not_released"
    wrong = http.post(
        f"/v1/airlock/sealed/{item['id']}/release",
        json={"content_base64": base64.b64encode(plaintext + b" ").decode()},
    )
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "sealed_plaintext_mismatch"
    assert http.get(f"/v1/airlock/sealed/{item['id']}").json()["released_at"] is None
    with lab.db.session() as session:
        assert ledger.logged_events(session, ["sealed.released"]) == []
    assert http.get(url, headers=admin).status_code == 409
    done = http.post(
        f"/v1/airlock/sealed/{item['id']}/release", json={"content_base64": base64.b64encode(plaintext).decode()}
    )
    assert done.status_code == 200, done.text
    assert done.json()["released_at"] is not None and "org-" in done.json()["released_by"]
    readable = http.get(url, headers=admin)
    assert readable.status_code == 200 and readable.content == plaintext
    again = http.post(
        f"/v1/airlock/sealed/{item['id']}/release", json={"content_base64": base64.b64encode(plaintext).decode()}
    )
    assert again.status_code == 409 and again.json()["error"]["code"] == "sealed_item_released"
    with lab.db.session() as session:
        (released,) = ledger.logged_events(session, ["sealed.released"])
    assert released.body["item"] == item["id"] and released.body["grant"] == item["grant_id"]
    assert released.body["sha256"] == item["plaintext_sha256"] and released.body["released_by"]
    assert any(
        row.path == f"/v1/airlock/sealed/{item['id']}/release" and row.status_code == 200 for row in lab.audit_rows()
    )


def test_finetune_canary_under_sealed_is_unreadable_to_the_lab_until_released(
    ft_lab: tuple[Lab, Path],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import base64

    from typer.testing import CliRunner

    from airlock.cli import app as cli_app
    from airlock.config import reset_settings

    lab, directory = ft_lab
    caplog.set_level(logging.DEBUG)
    canary = CANARY + "-sealed-ft"
    gid, key = lab.grant(
        "org-s", model="tiny", variants=["helpful-only"], scopes=["sample", "finetune"], retention_finetune="sealed"
    )
    seal_key = _accept(lab, gid, key)
    client, file_id = _finetune(lab, key, canary)
    with pytest.raises(openai.NotFoundError):
        client.files.content(file_id)  # the readable bytes are gone, as under "none"
    lab.server.flush_audit()
    home = get_settings().artifacts_dir
    needle = canary.encode()
    assert canary not in _dump(directory / "airlock.db")
    assert _grep(home, needle) == [] and _grep(directory, needle) == []
    assert canary not in caplog.text

    with httpx.Client(base_url=lab.url, headers={"Authorization": f"Bearer {key}"}, timeout=HTTP_TIMEOUT) as http:
        (item,) = http.get("/v1/airlock/sealed").json()
        assert (item["kind"], item["ref"], item["capability"], item["grant_id"]) == (
            "training_file",
            file_id,
            "finetune",
            gid,
        )
        opened = _open_all(http, seal_key)["training_file"]
        assert needle in opened and item["size"] == len(opened)

        # The evaluator's CLI: fetch opens it locally with the seal key; the lab's lists the grant's items.
        key_file = tmp_path / "seal.key"
        key_file.write_text(base64.b64encode(bytes(seal_key)).decode())
        out = tmp_path / "train.jsonl"
        env = {"AIRLOCK_BASE_URL": lab.url + "/v1", "AIRLOCK_API_KEY": key}
        fetched = CliRunner().invoke(
            cli_app, ["sealed", "fetch", item["id"], "-o", str(out), "--seal-key", str(key_file)], env=env
        )
        assert fetched.exit_code == 0, fetched.output
        assert out.read_bytes() == opened
        # The operator, on the database.
        monkeypatch.setenv("AIRLOCK_DATABASE_URL", lab.db.engine.url.render_as_string(hide_password=False))
        reset_settings()
        listed = CliRunner().invoke(cli_app, ["sealed", "list", "--grant", gid, "--json"])
        assert listed.exit_code == 0, listed.output
        assert [row["id"] for row in json.loads(listed.output)] == [item["id"]] and canary not in listed.output
        other = CliRunner().invoke(
            cli_app, ["sealed", "fetch", item["id"], "--seal-key", str(tmp_path / "absent.key")], env=env
        )
        assert other.exit_code == 1 and "no seal key" in other.output

        _release(lab, http, item, opened)
    assert _grep(home, needle), "a released item is readable by the lab"


@needs_bwrap
def test_interp_canary_under_sealed_is_sealed_once_fetched(
    interp_lab: tuple[Lab, Path], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    from tests.interp.test_interp_api import _wait

    lab, directory = interp_lab
    caplog.set_level(logging.DEBUG)
    gid, key = lab.grant("org-s", model="tiny", variants=["helpful-only"], scopes=["interp"], retention_interp="sealed")
    seal_key = _accept(lab, gid, key)
    with httpx.Client(base_url=lab.url, headers={"Authorization": f"Bearer {key}"}, timeout=HTTP_TIMEOUT) as http:
        body = {"model": "tiny/helpful-only", "code": INTERP_CODE, "args": {"secret": CANARY}}
        job_id = http.post("/v1/airlock/interp/jobs", json=body).json()["id"]
        done = _wait(http, job_id, until=("succeeded", "failed"))
        assert done["status"] == "succeeded", done
        assert CANARY in done["logs"]
        result = http.get(f"/v1/airlock/interp/jobs/{job_id}/result")
        assert result.json()["value"]["echo"] == CANARY, result.text
        assert http.get(f"/v1/airlock/interp/jobs/{job_id}/result.npz").status_code == 200
        assert http.get(f"/v1/airlock/interp/jobs/{job_id}/result").status_code == 409
        assert http.get(f"/v1/airlock/interp/jobs/{job_id}").json()["logs"] == ""
        lab.server.flush_audit()
        needle = CANARY.encode()
        assert CANARY not in _dump(directory / "airlock.db")
        assert _grep(get_settings().artifacts_dir, needle) == [] and _grep(directory, needle) == []
        assert CANARY not in caplog.text
        opened = _open_all(http, seal_key)
        assert set(opened) == {"interp_code", "interp_args", "interp_result", "interp_arrays", "interp_logs"}
        assert INTERP_CODE.encode() == opened["interp_code"]
        assert json.loads(opened["interp_args"]) == {"secret": CANARY}
        assert needle in opened["interp_result"]  # the stored result document, as the evaluator fetched it
        assert needle in opened["interp_logs"]
        items = {item["kind"]: item for item in http.get("/v1/airlock/sealed").json()}
        assert all(item["ref"] == job_id for item in items.values())

    # The evaluator's CLI releases one item end to end: fetch, open with the seal key, send back.
    import base64

    from typer.testing import CliRunner

    from airlock.cli import app as cli_app

    key_file = tmp_path / "seal.key"
    key_file.write_text(base64.b64encode(bytes(seal_key)).decode())
    env = {"AIRLOCK_BASE_URL": lab.url + "/v1", "AIRLOCK_API_KEY": key}
    listed = CliRunner().invoke(cli_app, ["sealed", "list"], env=env)
    assert listed.exit_code == 0 and items["interp_logs"]["id"] in listed.output, listed.output
    logs_id = items["interp_logs"]["id"]
    released = CliRunner().invoke(
        cli_app, ["sealed", "release", logs_id, "--yes", "--seal-key", str(key_file)], env=env
    )
    assert released.exit_code == 0, released.output
    admin = {"Authorization": f"Bearer {lab.admin_token}"}
    content = httpx.get(f"{lab.url}/v1/airlock/admin/sealed/{logs_id}/content", headers=admin, timeout=30)
    assert content.status_code == 200 and content.content == opened["interp_logs"]
    code_id = items["interp_code"]["id"]
    assert (
        httpx.get(
            f"{lab.url}/v1/airlock/admin/sealed/{code_id}/content", headers=admin, timeout=HTTP_TIMEOUT
        ).status_code
        == 409
    )


def test_redteam_transcript_under_sealed_on_either_database(db: Any, db_url: str) -> None:
    """Closing a session seals its transcript (the digest the ledger commits to); no words in a dump until release."""
    from nacl.public import SealedBox

    from airlock.ledger import service as ledger
    from tests.conftest import FAKE_MANIFEST, running_lab

    with running_lab(db, FAKE_MANIFEST) as lab:
        gid, key = lab.grant("org-s", scopes=["sample", "redteam"], retention_redteam="sealed")
        seal_key = _accept(lab, gid, key)
        with httpx.Client(base_url=lab.url, headers={"Authorization": f"Bearer {key}"}, timeout=HTTP_TIMEOUT) as rt:
            sid = rt.post("/v1/airlock/redteam/sessions", json={"models": ["m1/helpful-only"]}).json()["id"]
            assert rt.post(f"/v1/airlock/redteam/sessions/{sid}/turns", json={"content": CANARY}).status_code == 201
            assert rt.get("/v1/airlock/sealed").json() == []  # nothing sealed while the session is open
            assert rt.post(f"/v1/airlock/redteam/sessions/{sid}/close").status_code == 200
            kept = rt.get(f"/v1/airlock/redteam/sessions/{sid}").json()
            assert kept["transcript"][0]["prompt"] == ""
            lab.server.flush_audit()
            assert CANARY not in _database_dump(db_url)
            assert _grep(get_settings().artifacts_dir, CANARY.encode()) == []
            (item,) = rt.get("/v1/airlock/sealed").json()
            assert (item["kind"], item["ref"]) == ("redteam_transcript", sid)
            opened = SealedBox(seal_key).decrypt(rt.get(f"/v1/airlock/sealed/{item['id']}/ciphertext").content)
            assert json.loads(opened)[0]["prompt"] == CANARY
            with lab.db.session() as session:
                (closed,) = ledger.logged_events(session, ["redteam.session"])
                (stored,) = ledger.logged_events(session, ["sealed.stored"])
            # The sealed transcript is exactly what the closing event committed to.
            assert json.loads(closed.openings["transcript"][1]) == {"sha256": item["plaintext_sha256"]}
            assert stored.body["sha256"] == item["plaintext_sha256"] and stored.body["item"] == item["id"]
            _release(lab, rt, item, opened)
            assert CANARY not in _database_dump(db_url)  # released content lives in the artifact store
