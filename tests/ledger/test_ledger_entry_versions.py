"""Entries are RFC 8785 canonical JSON (version 2); version 1 entries in the legacy form still verify."""

from __future__ import annotations

import pytest

from airlock.canonical import legacy_bytes
from airlock.ledger._entry import canonical, parse_entry, verify_opening

ENTRY = {"id": "lev_1", "kind": "eval.attested", "time": "2026-01-01T00:00:00.000000Z", "body": {"score": 1.0}}


def test_version_2_is_rfc8785() -> None:
    text = canonical({**ENTRY, "v": 2})
    assert '"score":1}' in text and parse_entry(text)["v"] == 2
    with pytest.raises(ValueError, match="not in canonical JSON form"):
        parse_entry(legacy_bytes({**ENTRY, "v": 2}).decode())  # 1.0 where JCS writes 1


def test_version_1_entries_keep_their_legacy_form() -> None:
    old = legacy_bytes({**ENTRY, "v": 1}).decode()
    assert '"score":1.0}' in old and parse_entry(old)["body"] == {"score": 1.0}
    with pytest.raises(ValueError, match="not in canonical JSON form"):
        parse_entry(old.replace('"score":1.0', '"score": 1.0'))
    with pytest.raises(ValueError, match="unknown entry version"):
        parse_entry(canonical({**ENTRY, "v": 3}))


def test_commitments_open_in_either_form() -> None:
    import hashlib

    salt = "00" * 32
    legacy = hashlib.sha256(bytes(32) + legacy_bytes({"q": 1.0})).hexdigest()
    assert verify_opening(legacy, salt, {"q": 1.0})
    assert not verify_opening(legacy, salt, {"q": 2.0})
