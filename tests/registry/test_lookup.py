"""Version lookup by label or hash prefix, and the per-variant output-token cap, on SQLite and PostgreSQL."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from airlock.errors import ConfigError, InvalidRequestError, NotFoundError
from airlock.ids import parse_model_id
from airlock.registry import service
from airlock.registry.schemas import LOCAL_DEFAULT_CONTEXT, LOCAL_DEFAULT_MAX_TOKENS
from tests.conftest import FAKE_MANIFEST


def _synced(db: Any, manifest: dict[str, Any]) -> None:
    with db.session() as session:
        service.sync_manifest(session, service.parse_manifest(manifest))


def _label(db: Any, model_id: str) -> str:
    with db.session() as session:
        return service.resolve(session, parse_model_id(model_id))[1].label


def _two_versions() -> dict[str, Any]:
    manifest = copy.deepcopy(FAKE_MANIFEST)
    manifest["models"][0]["versions"].append(
        {"label": "v2", "content_hash": "ab" * 32, "variants": [{"name": "production", "backend": "fake"}]}
    )
    return manifest


@pytest.mark.parametrize(
    "version",
    [
        "________",  # LIKE's one-character wildcard, eight times: used to match any hash
        "%",
        "%%%%%%%%",
        "a%",
        "aaaaaaa_",
        "abab%",
        "ABABABAB",  # hashes are lowercase hex; an uppercase prefix names nothing
        "abababa",  # too short to be a hash prefix
        "abababaz",
        "ab\\_abab",
    ],
)
def test_wildcards_and_non_hex_prefixes_name_no_version(db: Any, version: str) -> None:
    _synced(db, _two_versions())
    with pytest.raises(NotFoundError):
        _label(db, f"m1@{version}/production")


def test_hash_prefix_resolves_by_exact_comparison(db: Any) -> None:
    _synced(db, _two_versions())
    assert _label(db, "m1@abababab/production") == "v2"
    assert _label(db, "m1@" + "ab" * 32 + "/production") == "v2"
    assert _label(db, "m1@aaaaaaaaaaaa/production") == "v1"
    assert _label(db, "m1@v1/production") == "v1"  # labels still win


def test_ambiguous_hash_prefix_is_a_400(db: Any) -> None:
    manifest = _two_versions()
    manifest["models"][0]["versions"].append(
        {"label": "v3", "content_hash": "ab" * 16 + "cd" * 16, "variants": [{"name": "production", "backend": "fake"}]}
    )
    _synced(db, manifest)
    with pytest.raises(InvalidRequestError) as info:
        _label(db, "m1@abababab/production")
    assert info.value.code == "ambiguous_version"
    assert _label(db, "m1@" + "ab" * 16 + "c/production") == "v3"


def _resolved(db: Any, model_id: str) -> service.ResolvedVariant:
    with db.session() as session:
        return service.resolve_variant(session, parse_model_id(model_id))


def test_max_output_tokens_is_synced_and_resolved(db: Any) -> None:
    manifest = copy.deepcopy(FAKE_MANIFEST)
    variants = manifest["models"][0]["versions"][0]["variants"]
    variants[1]["max_output_tokens"] = 64
    _synced(db, manifest)
    assert _resolved(db, "m1/helpful-only").output_token_limit() == 64
    # Unset: a backend without a context of its own gets the general default.
    assert _resolved(db, "m1/production").max_output_tokens is None
    assert _resolved(db, "m1/production").output_token_limit() == service.DEFAULT_MAX_OUTPUT_TOKENS

    variants[1]["max_output_tokens"] = 128
    with db.session() as session:
        report = service.sync_manifest(session, service.parse_manifest(manifest))
    assert "variant m1@v1/helpful-only" in report.updated
    assert _resolved(db, "m1/helpful-only").output_token_limit() == 128


@pytest.mark.parametrize(
    ("backend", "config", "expected"),
    [
        ("local", {}, LOCAL_DEFAULT_CONTEXT),
        ("local", {"max_context": 512}, 512),
        ("openai_upstream", {}, service.DEFAULT_MAX_OUTPUT_TOKENS),
        ("fake", {"max_context": True}, service.DEFAULT_MAX_OUTPUT_TOKENS),
    ],
)
def test_default_cap_derives_from_the_backend_context(backend: str, config: dict[str, Any], expected: int) -> None:
    resolved = service.ResolvedVariant(
        model_id="m",
        model_name="m",
        version_id="v",
        version_label="v1",
        variant_id="x",
        variant_name="x",
        backend=backend,
        backend_config=config,
        mitigations=[],
    )
    assert resolved.output_token_limit() == expected


def test_local_defaults_match_the_local_backend() -> None:
    pytest.importorskip("torch")
    from airlock.backends.local import LocalBackendConfig

    assert LocalBackendConfig().max_context == LOCAL_DEFAULT_CONTEXT
    assert LocalBackendConfig().default_max_tokens == LOCAL_DEFAULT_MAX_TOKENS


@pytest.mark.parametrize(("config", "ok"), [({}, False), ({"default_max_tokens": 64}, True)])
def test_local_default_generation_must_fit_the_cap(config: dict[str, Any], ok: bool) -> None:
    variant = {"name": "x", "backend": "local", "backend_config": config, "max_output_tokens": 100}
    manifest = {"models": [{"name": "m", "versions": [{"content_hash": "a" * 64, "variants": [variant]}]}]}
    if ok:
        service.parse_manifest(manifest)
    else:
        with pytest.raises(ConfigError, match="default_max_tokens"):
            service.parse_manifest(manifest)


@pytest.mark.parametrize("value", [0, -1, 1 << 21, "many"])
def test_max_output_tokens_out_of_range_is_a_manifest_error(value: Any) -> None:
    manifest = copy.deepcopy(FAKE_MANIFEST)
    manifest["models"][0]["versions"][0]["variants"][0]["max_output_tokens"] = value
    with pytest.raises(ConfigError, match="max_output_tokens"):
        service.parse_manifest(manifest)
