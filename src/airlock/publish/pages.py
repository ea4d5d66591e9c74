"""The public HTML page of a published report: evaluator Markdown rendered without raw HTML."""

from __future__ import annotations

import html
import re
import secrets
from functools import partial

from airlock.publish import redaction
from airlock.publish.schemas import ReportPublicView

# Served with every page: no scripts, no external resources, images only from this origin.
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; base-uri 'none'"

# markdown-it escapes <, >, & and " in text and attributes, so with raw HTML off every "<" of its
# output opens a real tag and the tag ends at the next ">".
_TAG = re.compile(r"(<[^>]*>)")

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;line-height:1.5;color:#222}
header p,footer{color:#555;font-size:.9rem} code{font-size:.85em;word-break:break-all}
mark.redacted{background:#222;color:#eee;padding:0 .3em;border-radius:3px}
mark.revealed{background:#dfd;padding:0 .3em;border-radius:3px;font-size:.8em}
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:.2em .5em;font-size:.9rem}
blockquote{border-left:4px solid #c90;margin:0;padding:.2em 1em;background:#fff8e6}
img{max-width:100%}
"""


def _markdown(text: str) -> str:
    from markdown_it import MarkdownIt

    # commonmark with raw HTML off: the evaluator's text cannot inject markup or scripts, and
    # markdown-it refuses javascript:/vbscript:/file: links by default.
    rendered: str = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    return rendered


def _body_html(view: ReportPublicView) -> str:
    """Render ``body_revealed`` with each real placeholder or reveal marker shown as a ``<mark>``.

    Only the report's own markers are marked: each is swapped for a random, Markdown-inert nonce
    before rendering and back afterwards, so look-alikes the author typed (escaped, as entities)
    stay plain text. A nonce inside a tag (an image's alt, a link's title) becomes plain text.
    """
    body = view.body_revealed
    marks: dict[str, tuple[str, str]] = {}
    for r in view.redactions:
        if r.revealed:
            kind, marker = "revealed", redaction.revealed_marker(r.number, r.commitment)
        else:
            kind, marker = "redacted", redaction.placeholder(r.number, r.reason, r.commitment)
        nonce = f"AIRLOCKMARK{secrets.token_hex(16)}"
        body = body.replace(marker, nonce)
        label = html.escape(f"[{kind} #{r.number}]")
        mark = f'<mark class="{kind}" title="sha256:{html.escape(r.commitment)}">{label}</mark>'
        marks[nonce] = (mark, label)
    rendered = _markdown(body)
    if not marks:
        return rendered
    nonces = re.compile("|".join(marks))

    def swap(match: re.Match[str], *, in_tag: bool) -> str:
        mark, label = marks[match.group(0)]
        return label if in_tag else mark

    parts = _TAG.split(rendered)  # even indexes: text between tags; odd: whole tags
    return "".join(nonces.sub(partial(swap, in_tag=bool(i % 2)), part) for i, part in enumerate(parts))


def render_page(view: ReportPublicView) -> str:
    """Return the report as one self-contained HTML page (revealed spans filled in)."""
    e = html.escape
    body = _body_html(view)
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{e(view.title)}</title><style>{_STYLE}</style></head><body>",
        f"<header><h1>{e(view.title)}</h1><p>{e(view.evaluator)} on <b>{e(view.model)}@{e(view.version)}</b>",
        f" (weights <code>{e(view.version_hash[:16])}</code>), revision {view.revision}, published",
        f" {e(view.published_at.isoformat())} by {e(view.published_reason)}.</p></header>",
        f"<main>{body}</main>",
    ]
    for a in view.attachments:
        src = f"/public/reports/{e(view.id)}/attachments/{e(a.id)}"
        parts.append(
            f'<figure><img src="{src}" alt="{e(a.filename)}"><figcaption>{e(a.filename)}</figcaption></figure>'
        )
    if view.redactions:
        parts.append("<h2>Redactions</h2><table><tr><th>#</th><th>reason</th><th>commitment</th><th>state</th></tr>")
        for r in view.redactions:
            state = f"revealed {e(r.revealed_at.isoformat())}" if r.revealed_at else "hidden"
            parts.append(
                f"<tr><td>{r.number}</td><td>{e(r.reason)}</td><td><code>{e(r.commitment)}</code></td>"
                f"<td>{state}</td></tr>"
            )
        parts.append("</table>")
    if view.results:
        parts.append("<h2>Attested results</h2><table><tr><th>result</th><th>task</th><th>variant</th>")
        parts.append("<th>n</th><th>metrics</th><th>signature</th></tr>")
        for res in view.results:
            metrics = ", ".join(f"{k}={v.get('value')}" for k, v in res.metrics.items() if isinstance(v, dict))
            ok = "valid" if res.signature_valid else "NOT VERIFIED"
            parts.append(
                f"<tr><td><code>{e(res.id)}</code></td><td>{e(res.task)}</td><td>{e(res.variant)}</td>"
                f"<td>{res.samples}</td><td>{e(metrics)}</td><td>{ok}</td></tr>"
            )
        parts.append("</table>")
    if view.clock.extensions:
        parts.append("<h2>Publication delayed by the lab</h2><table><tr><th>when</th><th>decider</th>")
        parts.append("<th>business days</th><th>deadline</th><th>justification</th></tr>")
        for x in view.clock.extensions:
            parts.append(
                f"<tr><td>{e(x.created_at.isoformat())}</td><td>{e(x.decider)} ({e(x.role)})</td>"
                f"<td>{x.business_days}</td><td>{e(x.previous_deadline.isoformat())} → "
                f"{e(x.new_deadline.isoformat())}</td><td>{e(x.justification)}</td></tr>"
            )
        parts.append("</table>")
    if view.lab_comments:
        parts.append("<h2>Lab comments</h2>")
        for c in view.lab_comments:
            parts.append(
                f"<blockquote><p><b>{e(c.author)}</b> ({e(c.role)}, {e(c.created_at.isoformat())})</p>"
                f"{_markdown(c.body)}</blockquote>"
            )
    ledger = f", ledger entry {view.ledger_index}" if view.ledger_index is not None else ""
    parts.append(
        f"<footer><p>Content hash <code>sha256:{e(view.content_hash)}</code>{ledger}. "
        f'Verify: <a href="/public/reports/{e(view.id)}">JSON</a>, '
        f"<code>airlock report verify {e(view.id)}</code>.</p></footer></body></html>"
    )
    return "".join(parts)
