"""The fingerprint scheme and the vectorised check: equal to the reference, private, and measured on real text."""

from __future__ import annotations

import hmac
import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airlock.contamination.matcher import Checker, check_batches, keyed_words, prepare_batch
from airlock.contamination.scheme import Fingerprint, Scheme, fingerprint_items, item_shingles, words
from tests.contamination.corpus_text import insert, light_edit, paragraphs, split_modules, stdlib_files

# Text that exercises every normalisation path: ASCII, accents composed and decomposed, ligatures,
# full-width forms, non-breaking and other spaces, scripts without case, emoji, the separator the
# check uses internally, and words longer than the hash's 8-byte chunks.
_PIECES = st.sampled_from(
    [
        *"abcXYZ019 .,;:-_'\"\n\t",
        *("é", "e\u0301", "E\u0301", "ß", "ﬁ", "Ａ", "½", "\u00a0", "\u2003", "\u3000", "—", "“", "…"),
        *("Ж", "ж", "日本", "ي", "١", "\U0001f600", "\ue000", "İ", "ǅ", "x" * 40, "é" * 20, "q" * 300),
    ]
)
TEXTS = st.lists(st.lists(_PIECES, max_size=40).map("".join), min_size=1, max_size=6)


@given(TEXTS)
@settings(max_examples=200, deadline=None)
def test_the_lab_side_words_are_exactly_the_reference_words(texts: list[str]) -> None:
    buf, starts = prepare_batch(texts)
    bounds = [*starts.tolist(), len(buf) + 1]
    for i, text in enumerate(texts):
        doc = buf[bounds[i] : bounds[i + 1] - 1].decode("utf-8")
        assert doc.split() == words(text), (text, doc)


def test_keyed_words_is_hmac_sha256_truncated() -> None:
    for salt in (b"s" * 16, bytes(range(64)), b"k" * 100):
        ws = [b"alpha", "ωμέγα".encode(), b"", b"x" * 300]
        got = keyed_words(salt, ws).tolist()
        want = [int.from_bytes(hmac.digest(salt, w, "sha256")[:8], "little") for w in ws]
        assert got == want


@given(TEXTS)
@settings(max_examples=100, deadline=None)
def test_every_shingle_of_an_item_is_found_in_a_document_holding_it(texts: list[str]) -> None:
    fp = fingerprint_items([(str(i), t) for i, t in enumerate(texts)], salt=b"\x01" * 32, scheme=Scheme(2, 1.0, 1))
    matches = Checker([("r", fp)]).check([(f"d{i}", t) for i, t in enumerate(texts)])
    own = {(m.document, m.item): m for m in matches if m.document == f"d{m.item}"}
    for item in fp.items:
        m = own[(f"d{item.id}", item.id)]
        assert (m.fraction, m.shingles, m.of) == (1.0, item.shingles.size, item.shingles.size)


def test_the_fingerprint_holds_no_text_and_each_registration_has_its_own_salt() -> None:
    item = "Return the Fourier coefficients of the sampled periodic waveform, normalised by its length."
    a = fingerprint_items([("q1", item)]).to_json()
    b = fingerprint_items([("q1", item)]).to_json()
    blob = json.dumps(a).lower()
    assert not [w for w in words(item) if len(w) > 3 and w in blob]
    assert a["salt"] != b["salt"] and a["items"][0]["shingles"] != b["items"][0]["shingles"]
    # Only shingles with a word that is not a stop word count; an item of stop words is skipped.
    fp = fingerprint_items([("x", "it is what it is and so on"), ("y", item)])
    assert fp.skipped == 1 and [i.id for i in fp.items] == ["y"]
    assert Fingerprint.from_json(json.loads(json.dumps(fp.to_json()))).items[0].shingles.tolist() == (
        fp.items[0].shingles.tolist()
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format="other"), "format"),
        (lambda d: d.update(salt="ab"), "salt"),
        (lambda d: d["scheme"].update(hash="md5"), "hash"),
        (lambda d: d["scheme"].update(ngram=1), "ngram"),
        (lambda d: d["items"].append(dict(d["items"][0])), "distinct"),
        (lambda d: d["items"][0].update(shingles="!!"), "malformed"),
        (lambda d: d["items"][0].update(shingles="AAEAAAAAAAA="), "sorted"),
        (lambda d: d.update(items=[]), "no items"),
    ],
)
def test_a_malformed_fingerprint_is_refused_naming_the_problem(change: object, message: str) -> None:
    data = fingerprint_items([("a", "the quick brown fox jumps over the lazy dog")]).to_json()
    change(data)  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        Fingerprint.from_json(data)


def test_recall_and_false_positives_measured_on_standard_library_text() -> None:
    """Items from one half of the stdlib's modules, unrelated documents from the other half."""
    test_files, corpus_files = split_modules(stdlib_files())
    rng = random.Random(5)
    pool = [p for p in paragraphs(test_files) if 12 <= len(p.split()) <= 120]
    items = rng.sample(pool, min(300, len(pool)))
    # The stdlib repeats its own docstrings between modules (io and _pyio, queue and asyncio): a
    # document quoting 6 words of an item holds real overlap, so it is not "unrelated".
    quoted = {" ".join(ws[i : i + 6]) for t in items for ws in [words(t)] for i in range(len(ws) - 5)}
    docs = []
    for para in paragraphs(corpus_files[::3]):
        ws = words(para)
        if not any(" ".join(ws[i : i + 6]) in quoted for i in range(len(ws) - 5)):
            docs.append(para)
    assert len(docs) >= 2000
    fp = fingerprint_items([(str(i), t) for i, t in enumerate(items)])
    checker = Checker([("r", fp)])
    flagged = {m.document for m in checker.check([(f"u{i}", d) for i, d in enumerate(docs)])}
    assert len(flagged) / len(docs) <= 0.001, sorted(flagged)[:5]

    edited = [(item.id, insert(light_edit(items[int(item.id)], rng), rng.choice(docs), rng)) for item in fp.items]
    found = {m.document for m in checker.check(edited) if m.document == m.item}
    assert len(found) / len(edited) >= 0.99
    # The edits really were edits: most copies lost shingles, yet matched.
    partial = [m for m in checker.check(edited) if m.document == m.item and m.fraction < 1.0]
    assert len(partial) >= len(edited) // 2


def test_item_shingles_are_sorted_distinct_uint32() -> None:
    hashes = item_shingles("One two three, one two three; four five six!", b"s" * 32, 3)
    assert hashes.dtype == np.uint32 and np.all(np.diff(hashes.astype(np.int64)) > 0)


def test_checking_in_worker_processes_gives_the_same_matches_in_order() -> None:
    rng = random.Random(3)
    items = [(str(i), " ".join(rng.choice(ALPHA_WORDS) for _ in range(12))) for i in range(20)]
    fp = fingerprint_items(items)
    docs = [(f"d{i}", f"noise {items[i % 20][1] if i % 3 == 0 else 'nothing relevant'} tail") for i in range(90)]
    batches = [docs[i : i + 10] for i in range(0, len(docs), 10)]
    one = list(check_batches([("r", fp)], batches, workers=1))
    two = list(check_batches([("r", fp)], iter(batches), workers=2))
    assert one == two
    assert [(m.document, m.item) for found, _ in one for m in found] == [
        (f"d{i}", str(i % 20)) for i in range(0, 90, 3)
    ]
    assert sum(words for _, words in one) > 0


ALPHA_WORDS = [a + b + c for a in "bcdfg" for b in "aeiou" for c in "klmnprst"]


def test_a_check_that_forgets_its_vocabulary_finds_the_same_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    import airlock.contamination.matcher as matcher

    rng = random.Random(4)
    items = [(str(i), " ".join(rng.choice(ALPHA_WORDS) for _ in range(10))) for i in range(10)]
    fp = fingerprint_items(items)
    docs = [(f"d{i}", f"{rng.choice(ALPHA_WORDS)} {items[i % 10][1]} {rng.choice(ALPHA_WORDS)}") for i in range(40)]
    keep = [m for part in (docs[:20], docs[20:]) for m in Checker([("r", fp)]).check(part)]
    monkeypatch.setattr(matcher, "_MAX_VOCABULARY", 5)
    forgetful = Checker([("r", fp)])
    forget = forgetful.check(docs[:20])
    first = forgetful.vocabulary
    forget += forgetful.check(docs[20:])
    assert forget == keep and len(keep) == 40
    assert forgetful.vocabulary is not first  # the second batch started afresh
