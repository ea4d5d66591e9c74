"""Manifest validation and sync into the registry, on SQLite and PostgreSQL."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from airlock.errors import ConfigError, ConflictError, InvalidRequestError, NotFoundError
from airlock.ids import parse_model_id
from airlock.registry import service
from airlock.registry.models import StageChange
from tests.conftest import FAKE_MANIFEST


def test_sync_creates_then_is_idempotent(db: Any) -> None:
    manifest = service.parse_manifest(FAKE_MANIFEST)
    with db.session() as session:
        first = service.sync_manifest(session, manifest)
    assert "model m1" in first.created and "variant m1@v1/production" in first.created
    with db.session() as session:
        again = service.sync_manifest(session, manifest)
    assert again.created == [] and again.updated == []
    with db.session() as session:
        _m, version, variant = service.resolve(session, parse_model_id("m1/production"))
        assert version.content_hash == "a" * 64
        assert [m.kind for m in variant.mitigations] == ["system_prompt", "input_filter", "output_filter"]
        assert [m.stance for m in variant.mitigations] == ["disabled_for_eval", "claimed", "claimed"]


def test_sync_updates_mitigations_and_stage(db: Any) -> None:
    with db.session() as session:
        service.sync_manifest(session, service.parse_manifest(FAKE_MANIFEST))
    changed = copy.deepcopy(FAKE_MANIFEST)
    version = changed["models"][0]["versions"][0]
    version["stage"] = "internal"
    version["variants"][0]["mitigations"] = version["variants"][0]["mitigations"][:1]
    with db.session() as session:
        report = service.sync_manifest(session, service.parse_manifest(changed), actor="tester")
    assert "variant m1@v1/production" in report.updated
    assert "version m1@v1 stage -> internal" in report.updated
    with db.session() as session:
        _m, ver, variant = service.resolve(session, parse_model_id("m1/production"))
        assert ver.stage == "internal" and len(variant.mitigations) == 1
        history = session.scalars(select(StageChange).where(StageChange.version_id == ver.id)).all()
        assert [(h.from_stage, h.to_stage, h.actor) for h in history] == [
            (None, "external-candidate", "manifest"),
            ("external-candidate", "internal", "tester"),
        ]


def test_label_cannot_be_repointed(db: Any) -> None:
    with db.session() as session:
        service.sync_manifest(session, service.parse_manifest(FAKE_MANIFEST))
    changed = copy.deepcopy(FAKE_MANIFEST)
    changed["models"][0]["versions"][0]["content_hash"] = "d" * 64
    with pytest.raises(ConflictError, match="new label"), db.session() as session:
        service.sync_manifest(session, service.parse_manifest(changed))
    with db.session() as session:  # nothing half-written
        assert service.resolve(session, parse_model_id("m1/production"))[1].content_hash == "a" * 64


def test_latest_version_is_default(db: Any) -> None:
    manifest = copy.deepcopy(FAKE_MANIFEST)
    manifest["models"][0]["versions"].append(
        {"label": "v2", "content_hash": "e" * 64, "variants": [{"name": "production", "backend": "fake"}]}
    )
    with db.session() as session:
        service.sync_manifest(session, service.parse_manifest(manifest))
        assert service.resolve(session, parse_model_id("m1/production"))[1].label == "v2"
        assert service.resolve(session, parse_model_id("m1@v1/production"))[1].label == "v1"
        assert service.resolve(session, parse_model_id("m1@eeeeeeee/production"))[1].label == "v2"
        with pytest.raises(NotFoundError):
            service.resolve(session, parse_model_id("m1@v2/helpful-only"))


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ([1, 2], "top level must be a mapping"),
        ({"modelz": []}, "modelz"),
        ({"models": [{"name": "x", "versions": []}]}, "models.0.versions"),
        ({"models": [{"name": "bad name", "versions": []}]}, "not a valid name"),
        ({"models": [{"name": "x", "versions": [{"variants": [{"name": "a"}]}]}]}, "weights"),
        (
            {"models": [{"name": "x", "versions": [{"content_hash": "z", "variants": [{"name": "a"}]}]}]},
            "content_hash",
        ),
        (
            {
                "models": [
                    {
                        "name": "x",
                        "versions": [
                            {
                                "content_hash": "a" * 64,
                                "variants": [
                                    {"name": "a", "mitigations": [{"name": "m", "kind": "k", "stance": "meh"}]}
                                ],
                            }
                        ],
                    }
                ]
            },
            "stance",
        ),
    ],
)
def test_manifest_validation_errors_are_clear(doc: Any, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        service.parse_manifest(doc)
    assert needle in info.value.message


def test_bad_mitigation_config_rejected_before_writing(db: Any) -> None:
    doc = {
        "models": [
            {
                "name": "x",
                "versions": [
                    {
                        "content_hash": "a" * 64,
                        "variants": [
                            {
                                "name": "p",
                                "backend": "fake",
                                "mitigations": [{"name": "f", "kind": "input_filter", "config": {"patterns": ["("]}}],
                            }
                        ],
                    }
                ],
            }
        ]
    }
    from airlock.mitigations import check_manifest

    with pytest.raises(ConfigError, match=r"x@a+/p: "):
        check_manifest(service.parse_manifest(doc))
    with db.session() as session:
        assert service.list_models(session) == []


def test_load_manifest_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="airlock init"):
        service.load_manifest(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        service.load_manifest(bad)


@pytest.mark.parametrize("model_id", ["", "m1", "/x", "m1@/x", "a/b/", "m1@v1@v2/x/"])
def test_parse_model_id_rejects_malformed(model_id: str) -> None:
    with pytest.raises(InvalidRequestError):
        parse_model_id(model_id)


def test_starter_manifest_is_valid() -> None:
    import yaml

    from airlock.cli import starter_manifest

    manifest = service.parse_manifest(yaml.safe_load(starter_manifest()))
    variants = {v.name: v for v in manifest.models[0].versions[0].variants}
    assert set(variants) == {"production", "helpful-only"}
    assert all(m.stance for m in variants["production"].mitigations)
