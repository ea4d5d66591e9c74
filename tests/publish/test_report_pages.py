"""The public HTML page: only the report's real placeholders and reveal markers become marks."""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime
from html.parser import HTMLParser

import pytest

from airlock.publish import pages, redaction, schemas
from airlock.publish.models import ReportRedaction
from airlock.publish.schemas import RedactionPublic, ReportPublicView

T0 = datetime(2030, 1, 1, tzinfo=UTC)
FAKE = "a" * 64


def view(source: str, reveal: Collection[int] = (), extra: str = "") -> ReportPublicView:
    """The public view of ``source`` (spans in ``reveal`` revealed); ``extra`` is appended unparsed."""
    pieces, spans = redaction.parse(source)
    sealed = redaction.seal(spans)
    public = redaction.render_public(pieces, sealed) + extra
    rows = [
        ReportRedaction(
            number=s.number,
            reason=s.reason,
            text=s.text,
            salt=s.salt,
            commitment=s.commitment,
            revealed_at=T0 if s.number in reveal else None,
        )
        for s in sealed
    ]
    return ReportPublicView.model_construct(
        id="rpt_1",
        title="t",
        evaluator="org-a",
        model="m1",
        version="v1",
        version_hash="a" * 64,
        revision=1,
        body=public,
        body_revealed=schemas.render_revealed(public, rows),
        redactions=[RedactionPublic.of(r) for r in rows],
        results=[],
        attachments=[],
        lab_comments=[],
        content_hash="0" * 64,
        published_at=T0,
        published_reason="agreement",
        ledger_index=None,
    )


class Elements(HTMLParser):
    """Collects start tags with their attributes, and the page's text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parsed(page: str) -> Elements:
    out = Elements()
    out.feed(page)
    out.close()
    return out


def marks(page: str) -> list[dict[str, str | None]]:
    return [attrs for tag, attrs in parsed(page).tags if tag == "mark"]


def test_real_placeholders_and_reveals_are_marked() -> None:
    v = view("A [[redact:why]]one[[/redact]] B [[redact]]two[[/redact]] C", reveal={2})
    page = pages.render_page(v)
    found = marks(page)
    assert [(m["class"], m["title"]) for m in found] == [
        ("redacted", f"sha256:{v.redactions[0].commitment}"),
        ("revealed", f"sha256:{v.redactions[1].commitment}"),
    ]
    assert ">[redacted #1]</mark>" in page and "two<mark" in page and "AIRLOCKMARK" not in page


@pytest.mark.parametrize(
    "fake",
    [
        "[\\[redacted #1 (export control) sha256:" + FAKE + "]]",  # a Markdown escape
        "&#91;[redacted #2 sha256:" + FAKE + "]]",  # an HTML entity
        "&#x5b;&#x5B;revealed #1 sha256:" + FAKE + "]]",
    ],
)
def test_typed_look_alikes_stay_plain_text(fake: str) -> None:
    v = view(f"Real [[redact]]secret[[/redact]]. Fake {fake} end.")
    page = pages.render_page(v)
    assert [m["title"] for m in marks(page)] == [f"sha256:{v.redactions[0].commitment}"]
    assert f"sha256:{FAKE}]]" in "".join(parsed(page).text)  # shown as the text it is


def test_markers_from_before_revealed_was_refused_stay_plain_text() -> None:
    # Stored bodies may predate the source check on "[[revealed": the page still does not mark them.
    page = pages.render_page(view("x", extra=f" [[revealed #3 sha256:{FAKE}]]"))
    assert marks(page) == [] and f"[[revealed #3 sha256:{FAKE}]]" in page


def test_placeholders_in_attributes_become_plain_labels() -> None:
    v = view('![[[redact]]x[[/redact]]](/a.png) and [l](/u "[[redact]]t[[/redact]]")', reveal={2})
    page = pages.render_page(v)
    tags = parsed(page).tags
    img = next(attrs for tag, attrs in tags if tag == "img" and attrs.get("src") == "/a.png")
    link = next(attrs for tag, attrs in tags if tag == "a" and attrs.get("href") == "/u")
    assert img["alt"] == "[redacted #1]" and link["title"] == "t[revealed #2]"
    assert marks(page) == [] and "<mark" not in page.split("<main>")[1].split("</main>")[0]
