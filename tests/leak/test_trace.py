"""Leak tracing: per-grant keys derived from the lab secret, and a leaked text ranked to its grant."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from airlock.access import service
from airlock.config import reset_settings
from airlock.leak.keys import watermark_key
from airlock.leak.trace import trace_tokens
from tests.backends.test_watermark import VOCAB, generate


def _grants(db: Any, count: int) -> list[str]:
    from airlock.registry.service import parse_manifest, sync_manifest
    from tests.conftest import FAKE_MANIFEST

    ids = []
    with db.session() as session:
        sync_manifest(session, parse_manifest(FAKE_MANIFEST))
        service.create_evaluator(session, "org-a")
        for _ in range(count):
            ids.append(
                service.create_grant(
                    session,
                    service.GrantRequest(evaluator="org-a", model="m1", variants=["helpful-only"], scopes=["sample"]),
                ).id
            )
    return ids


def test_keys_are_per_grant_and_stable(db: Any) -> None:
    a, b = _grants(db, 2)
    with db.session() as session:
        assert watermark_key(session, a) == watermark_key(session, a)
        assert watermark_key(session, a) != watermark_key(session, b)
        assert len(watermark_key(session, a)) == 32


def test_trace_ranks_the_producing_grant_first(db: Any) -> None:
    grants = _grants(db, 4)
    with db.session() as session:
        leaked = generate(watermark_key(session, grants[2]), 200, seed=3)
        matches = trace_tokens(session, [("toy", leaked)])
        assert matches[0].grant_id == grants[2]
        assert matches[0].p_adjusted < 1e-4 and matches[0].evaluator == "org-a"
        assert all(m.p_adjusted > 0.01 for m in matches[1:])
        plain = trace_tokens(session, [("toy", generate(None, 200, seed=3))])
        assert min(m.p_adjusted for m in plain) > 0.01


def test_cli_trace_names_the_grant(db: Any, tmp_path: Path, monkeypatch: Any) -> None:
    from airlock.backends.weights import load_tokenizer
    from airlock.cli import app

    grants = _grants(db, 3)
    tokenizer = load_tokenizer("tiny-random")
    # Whole-word tokens re-tokenize to themselves, so the CLI scores the ids that were generated.
    words = [i for t, i in sorted(tokenizer.get_vocab().items()) if t.startswith("Ġ") and t[1:].isalpha()][:VOCAB]
    with db.session() as session:
        toy = generate(watermark_key(session, grants[1]), 220, seed=4, support=words)
    text = tokenizer.decode(toy[4:])
    path = tmp_path / "leak.txt"
    path.write_text(text)
    monkeypatch.setenv("AIRLOCK_DATABASE_URL", db.engine.url.render_as_string(hide_password=False))
    reset_settings()
    result = CliRunner().invoke(app, ["leak", "trace", str(path), "--model", "tiny-random"])
    assert result.exit_code == 0, result.output
    assert f"attributed to grant {grants[1]}" in result.output
