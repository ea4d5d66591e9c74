"""Grant terms per capability: typed sections, validation, the HTTP and CLI forms, and the migration."""

from __future__ import annotations

from typing import Any, ClassVar

import httpx
import pytest
from alembic import command
from pydantic import PositiveInt
from sqlalchemy import text
from typer.testing import CliRunner

from airlock.access import seal, service, terms
from airlock.access.models import Grant
from airlock.access.quotas import SamplingTerms
from airlock.config import reset_settings
from airlock.db import Database
from airlock.finetune.terms import FinetuneTerms
from airlock.interp.terms import InterpTerms
from airlock.migrations import alembic_config
from airlock.redteam.terms import DEFAULT_REDTEAM_HOURS, redteam_hours
from airlock.registry import service as registry
from tests.conftest import FAKE_MANIFEST, HTTP_TIMEOUT, Lab, grant_request

GRANTS = "/v1/airlock/admin/grants"


@pytest.fixture
def lab_db(db: Database) -> Database:
    with db.session() as session:
        registry.sync_manifest(session, registry.parse_manifest(FAKE_MANIFEST))
        service.create_evaluator(session, "org-a")
    return db


def _issue(db: Database, **kwargs: Any) -> str:
    kwargs.setdefault("variants", ["production"])
    kwargs.setdefault("scopes", ["sample"])
    with db.session() as session:
        return service.create_grant(session, grant_request(evaluator="org-a", model="m1", **kwargs)).id


# ---------------------------------------------------------------- the sections


def test_every_builtin_section_is_registered_and_term_names_are_unique() -> None:
    import tomllib
    from pathlib import Path

    from airlock.schema import TERMS

    sections = terms.all_terms()
    assert {"sampling", "finetune", "interp", "publication", "redteam"} <= set(sections)
    # Each built-in section is an entry point too, so a process that never imports it still knows it.
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    points = project["project"]["entry-points"][terms.ENTRY_POINT_GROUP]
    assert points == {cls.section: f"{cls.__module__}:{cls.__qualname__}" for cls in TERMS}
    names = [name for cls in sections.values() for name in cls.model_fields]
    assert len(names) == len(set(names))
    assert terms.term_defaults()["watermark"] is True and terms.term_defaults()["quota_total_tokens"] is None


def test_terms_are_validated_flat_or_by_section_and_stored_without_defaults() -> None:
    given = {"quota_total_tokens": "1000", "finetune": {"quota_finetune_jobs": 2}, "watermark": True}
    assert terms.validate_terms(given) == {"quota_finetune_jobs": 2, "quota_total_tokens": 1000}
    with pytest.raises(terms.TermsError) as unknown:
        terms.validate_terms({"quota_totl_tokens": 5})
    assert unknown.value.code == "invalid_grant_terms" and unknown.value.param == "terms.quota_totl_tokens"
    assert "quota_total_tokens" in unknown.value.message  # the known names are listed
    with pytest.raises(terms.TermsError) as negative:
        terms.validate_terms({"quota_file_bytes": -1})
    assert negative.value.param == "terms.quota_file_bytes" and "greater than 0" in negative.value.message
    with pytest.raises(terms.TermsError) as misplaced:
        terms.validate_terms({"interp": {"quota_total_tokens": 5}})
    assert misplaced.value.param == "terms.interp.quota_total_tokens"


def test_a_new_capability_adds_its_terms_without_touching_access(
    lab_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(terms, "_sections", dict(terms._sections))
    monkeypatch.setattr(terms, "_owner", dict(terms._owner))

    @terms.register_terms
    class ProbeTerms(terms.Terms):
        section: ClassVar[str] = "probes"
        ledger_quota_names: ClassVar[dict[str, str]] = {"quota_probe_runs": "probe_runs"}
        quota_probe_runs: PositiveInt | None = None

    grant_id = _issue(lab_db, quota_probe_runs=3, quota_total_tokens=10)
    with lab_db.session() as session:
        grant = service.get_grant(session, grant_id)
        assert terms.terms_of(grant, ProbeTerms).quota_probe_runs == 3
        assert terms.terms_of(grant, SamplingTerms).quota_total_tokens == 10
        seal.check_grant(session, grant)
        assert seal.check_grants(session) == []
    with pytest.raises(Exception, match="already declared"):

        @terms.register_terms
        class Clash(terms.Terms):
            section: ClassVar[str] = "clash"
            quota_total_tokens: int | None = None


def test_each_capability_reads_its_own_section(lab_db: Database) -> None:
    grant_id = _issue(
        lab_db,
        scopes=["sample", "interp", "redteam"],
        quota_finetune_jobs=1,
        interp_full_logits=True,
        redteam_hours=2.5,
        watermark=False,
    )
    with lab_db.session() as session:
        grant = service.get_grant(session, grant_id)
        assert grant.terms == {
            "interp_full_logits": True,
            "quota_finetune_jobs": 1,
            "redteam_hours": 2.5,
            "watermark": False,
        }
        assert terms.terms_of(grant, FinetuneTerms).quota_finetune_jobs == 1
        assert terms.terms_of(grant, InterpTerms).interp_full_logits is True
        assert terms.terms_of(grant, SamplingTerms).watermark is False
        assert redteam_hours(grant) == 2.5
        other = service.get_grant(session, _issue(lab_db))
        assert redteam_hours(other) == DEFAULT_REDTEAM_HOURS


def test_issued_entries_publish_public_terms_and_commit_quotas(lab_db: Database) -> None:
    from airlock.access.events import grant_issued_event

    grant_id = _issue(lab_db, embargo_days=30, quota_total_tokens=9, redteam_hours=1)
    with lab_db.session() as session:
        body, confidential = grant_issued_event(session, service.get_grant(session, grant_id))
    assert body["embargo_days"] == 30 and body["watermark"] is True and body["interp_full_logits"] is False
    assert confidential["quotas"]["total_tokens"] == 9 and confidential["quotas"]["redteam_hours"] == 1
    assert confidential["terms"]["quota_total_tokens"] == 9 and "watermark" not in confidential["terms"]


# ---------------------------------------------------------------- the admin API and CLI


def test_the_admin_api_takes_terms_in_either_form_and_names_a_bad_one(lab: Lab) -> None:
    headers = {"Authorization": f"Bearer {lab.admin_token}"}
    base = {"evaluator": "org-a", "model": "m1", "variants": ["production"], "scopes": ["sample"]}
    with httpx.Client(base_url=lab.url, headers=headers, timeout=HTTP_TIMEOUT) as http:
        http.post("/v1/airlock/admin/evaluators", json={"name": "org-a"})
        made = http.post(
            GRANTS, json={**base, "quota_requests_per_minute": 7, "terms": {"finetune": {"quota_file_bytes": 99}}}
        )
        assert made.status_code == 201, made.text
        grant = made.json()
        assert grant["terms"]["sampling"] == {
            "quota_requests_per_minute": 7,
            "quota_total_tokens": None,
            "watermark": True,
        }
        assert grant["terms"]["finetune"]["quota_file_bytes"] == 99
        assert grant["quota_requests_per_minute"] == 7  # repeated flat for older clients
        before = len(http.get(GRANTS).json())
        for bad, param in (
            ({"terms": {"quota_tokens": 5}}, "terms.quota_tokens"),
            ({"terms": {"embargo_days": -3}}, "terms.embargo_days"),
            ({"terms": {"watermark": "sometimes"}}, "terms.watermark"),
        ):
            refused = http.post(GRANTS, json={**base, **bad})
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert error["code"] == "invalid_grant_terms" and error["param"] == param
        assert len(http.get(GRANTS).json()) == before  # nothing half-written
        schema = http.get("/openapi.json").json()["components"]["schemas"]["GrantCreate"]["properties"]["terms"]
        assert {"quota_total_tokens", "redteam_hours", "embargo_days"} <= set(schema["properties"])


def test_the_cli_lists_terms_and_takes_any_term(lab_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    from airlock.cli import app

    monkeypatch.setenv("AIRLOCK_DATABASE_URL", lab_db.url)
    reset_settings()
    runner = CliRunner()
    listed = runner.invoke(app, ["grant", "terms", "--json"])
    assert listed.exit_code == 0, listed.output
    assert {"section": "redteam", "name": "redteam_hours"}.items() <= next(
        row for row in __import__("json").loads(listed.output) if row["name"] == "redteam_hours"
    ).items()
    args = ["grant", "create", "--evaluator", "org-a", "--model", "m1", "--variants", "production"]
    made = runner.invoke(app, [*args, "--rpm", "5", "--term", "redteam_hours=3", "--term", "watermark=false"])
    assert made.exit_code == 0, made.output
    with lab_db.session() as session:
        grant = service.get_grant(session, made.output.strip())
        assert grant.terms == {"quota_requests_per_minute": 5, "redteam_hours": 3.0, "watermark": False}
    refused = runner.invoke(app, [*args, "--term", "no_such_term=1"])
    assert refused.exit_code != 0 and "unknown grant term 'no_such_term'" in " ".join(refused.output.split())


# ---------------------------------------------------------------- the migration


def test_grants_survive_the_migration_both_ways_with_seals_and_ledger_intact(lab_db: Database) -> None:
    plain = _issue(lab_db)
    rich = _issue(
        lab_db,
        quota_requests_per_minute=60,
        quota_total_tokens=10**6,
        quota_interp_cpu_seconds=12.5,
        interp_full_logits=True,
        embargo_days=30,
    )
    with lab_db.session() as session:
        before = {g: terms.row_terms(service.get_grant(session, g)) for g in (plain, rich)}
    config = alembic_config(lab_db.engine)
    command.downgrade(config, "0017")
    with lab_db.engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT quota_total_tokens, quota_interp_cpu_seconds, interp_full_logits, embargo_days FROM grants "
                "WHERE id = :id"
            ),
            {"id": rich},
        ).one()
    assert tuple(row) == (10**6, 12.5, True, 30)
    command.upgrade(config, "head")
    fresh = Database(lab_db.url)
    try:
        with fresh.session() as session:
            assert session.get(Grant, plain).terms == {}  # type: ignore[union-attr]
            assert {g: terms.row_terms(service.get_grant(session, g)) for g in (plain, rich)} == before
            for grant_id in (plain, rich):
                seal.check_grant(session, service.get_grant(session, grant_id))
            assert seal.check_grants(session) == []
    finally:
        fresh.dispose()


def test_downgrading_refuses_a_term_the_old_columns_cannot_hold(lab_db: Database) -> None:
    _issue(lab_db, scopes=["redteam"], redteam_hours=4)
    with pytest.raises(RuntimeError, match="redteam_hours"):
        command.downgrade(alembic_config(lab_db.engine), "0017")


def test_the_watermark_term_decides_whether_sampled_requests_carry_the_grant_key(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.fakes import EchoBackend

    seen: list[bytes | None] = []
    chat = EchoBackend.chat

    async def recording(self: EchoBackend, request: Any) -> Any:
        seen.append(request.watermark_key)
        return await chat(self, request)

    monkeypatch.setattr(EchoBackend, "chat", recording)
    body = {"model": "m1/helpful-only", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.7}
    for watermark in (True, False):
        _gid, key = lab.grant(watermark=watermark)
        reply = httpx.post(
            lab.url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=HTTP_TIMEOUT,
        )
        assert reply.status_code == 200, reply.text
    on, off = seen
    assert isinstance(on, bytes) and len(on) == 32 and off is None
