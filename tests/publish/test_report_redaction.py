"""Redaction markup and commitments: parsing, byte layout, verification, malformed input."""

from __future__ import annotations

import hashlib

import pytest

from airlock.errors import InvalidRequestError
from airlock.publish import redaction


def test_spans_become_placeholders_with_verifiable_commitments() -> None:
    source = "Intro [[redact:hazard]]the zyloxin recipe[[/redact]] and [[redact]] ünïcode [[/redact]] end."
    pieces, spans = redaction.parse(source)
    assert [(s.number, s.reason, s.text) for s in spans] == [(1, "hazard", "the zyloxin recipe"), (2, "", " ünïcode ")]
    sealed = redaction.seal(spans)
    public = redaction.render_public(pieces, sealed)
    assert "zyloxin" not in public and "ünïcode" not in public
    assert public == (
        f"Intro [[redacted #1 (hazard) sha256:{sealed[0].commitment}]] and "
        f"[[redacted #2 sha256:{sealed[1].commitment}]] end."
    )
    for item in sealed:
        assert len(bytes.fromhex(item.salt)) == 32
        # The documented layout: SHA-256 over the raw salt bytes followed by the UTF-8 text.
        assert item.commitment == hashlib.sha256(bytes.fromhex(item.salt) + item.text.encode("utf-8")).hexdigest()
        assert redaction.verify_commitment(item.commitment, item.salt, item.text)
        assert not redaction.verify_commitment(item.commitment, item.salt, item.text + " ")
        assert not redaction.verify_commitment(item.commitment, "00" * 32, item.text)
    assert sealed[0].salt != redaction.seal(spans)[0].salt  # fresh randomness every time


def test_known_vector() -> None:
    salt = bytes(range(32))
    assert redaction.commit("secret", salt) == hashlib.sha256(salt + b"secret").hexdigest()
    assert redaction.verify_commitment(redaction.commit("secret", salt), salt.hex(), "secret")
    assert not redaction.verify_commitment("not-hex", salt.hex(), "secret")
    assert not redaction.verify_commitment(redaction.commit("secret", salt), "zz", "secret")


def test_text_without_markup_is_unchanged() -> None:
    pieces, spans = redaction.parse("no [brackets] here [[link]]")
    assert spans == [] and redaction.render_public(pieces, []) == "no [brackets] here [[link]]"


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("a [[redact:x]]never closed", "never closed"),
        ("a [[/redact]] stray", "never opened"),
        ("[[redact]]a [[redact]]b[[/redact]][[/redact]]", "nested"),
        ("[[redact]]   [[/redact]]", "redacts nothing"),
        ("[[redact:x]]a[[/redact:y]]", "takes no reason"),
        ("[[redacted #1 sha256:abc]]", "written by Airlock, not typed"),
        ("[[revealed #3 sha256:" + "a" * 64 + "]]", "written by Airlock, not typed"),
        ("text[[Revealed #1]]", "written by Airlock, not typed"),
        ("[[redact:multi\nline]]a[[/redact]]", "not a valid"),
        ("[[redact:" + "r" * 201 + "]]a[[/redact]]", "over 200"),
    ],
)
def test_malformed_markup_is_a_400_naming_the_line(source: str, problem: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        redaction.parse("line one\n" + source)
    assert problem in info.value.message and "line 2" in info.value.message
    assert info.value.code == "malformed_redaction"


def test_exported_names() -> None:
    import airlock.publish

    modules = {"cli", "models", "routes", "service"}  # for other packages; not imported with the root
    names = set(airlock.publish.__all__) - modules
    assert sorted(names) == ["commit", "placeholder", "verify_commitment"]
    assert all(callable(getattr(airlock.publish, name)) for name in names)
