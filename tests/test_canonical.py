"""One canonical JSON (RFC 8785): the bytes other implementations produce, and clear refusals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from airlock.canonical import CanonicalJSONError, canonical_bytes, canonical_forms, legacy_bytes, sha256_hex

# Vectors from RFC 8785: section 3.2.3 (sorting by UTF-16 code units) and appendix B (numbers).
VECTORS: list[tuple[Any, bytes]] = [
    (
        {
            "\u20ac": "Euro Sign",
            "\r": "Carriage Return",
            "\ufb33": "Hebrew Letter Dalet With Dagesh",
            "1": "One",
            "\U0001f600": "Emoji: Grinning Face",
            "\u0080": "Control",
            "\u00f6": "Latin Small Letter O With Diaeresis",
        },
        '{"\\r":"Carriage Return","1":"One","\u0080":"Control","\u00f6":"Latin Small Letter O With Diaeresis",'
        '"\u20ac":"Euro Sign","\U0001f600":"Emoji: Grinning Face","\ufb33":"Hebrew Letter Dalet With Dagesh"}'.encode(),
    ),
    (
        [0.0, -0.0, 1.0, 1e21, 1e-7, 333333333.3333333, 1e23, 5e-324, 9007199254740991],
        b"[0,0,1,1e+21,1e-7,333333333.3333333,1e+23,5e-324,9007199254740991]",
    ),
    (
        {
            "numbers": [333333333.33333329, 1e30, 4.50, 2e-3, 0.000000000000000000000000001],
            "string": "\u20ac$\u000f\u000aA'\u0042\u0022\u005c\\\"\u002f",
            "literals": [None, True, False],
        },
        b'{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        b'"string":"\xe2\x82\xac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}',
    ),
]


@pytest.mark.parametrize(("data", "expected"), VECTORS, ids=["sorting", "numbers", "rfc-example"])
def test_rfc8785_vectors(data: Any, expected: bytes) -> None:
    assert canonical_bytes(data) == expected


def test_values_are_normalised_in_one_place() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=2)))
    assert canonical_bytes({"t": moment, "s": {3, 1}, "u": (1, 2)}) == (
        b'{"s":[1,3],"t":"2026-01-02T01:04:05.000006Z","u":[1,2]}'
    )
    assert sha256_hex({"a": 1}) == sha256_hex({"a": 1.0})  # one number, one encoding


@pytest.mark.parametrize(
    ("data", "path", "problem"),
    [
        ({"metrics": {"accuracy": float("nan")}}, "$.metrics.accuracy", "NaN and infinities are refused"),
        ({"scores": [1.0, float("-inf")]}, "$.scores[1]", "NaN and infinities are refused"),
        ({"quota": {"total tokens": 2**60}}, '$.quota["total tokens"]', "beyond 2^53 - 1"),
        ({"t": datetime(2026, 1, 1)}, "$.t", "naive datetimes are refused"),
        ({"k": {1: "x"}}, "$.k", "key 1 is not a string"),
        ({"o": object()}, "$.o", "object is not JSON data"),
    ],
)
def test_what_cannot_be_represented_is_refused_naming_the_field(data: Any, path: str, problem: str) -> None:
    with pytest.raises(CanonicalJSONError) as info:
        canonical_bytes(data)
    assert info.value.path == path and problem in str(info.value) and str(info.value).startswith(path)


def test_legacy_form_is_offered_only_where_it_differs() -> None:
    same = {"a": "b", "n": [1, 2]}
    assert list(canonical_forms(same)) == [canonical_bytes(same)] and legacy_bytes(same) == canonical_bytes(same)
    differs = {"x": 1.0, "t": datetime(2026, 1, 1, tzinfo=UTC)}
    assert list(canonical_forms(differs)) == [b'{"t":"2026-01-01T00:00:00.000000Z","x":1}', legacy_bytes(differs)]
