"""`airlock report ...`: evaluator drafting over HTTP, lab review on the database, offline checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from airlock.cli_support import console, fmt_ts, open_database, run_command

app = typer.Typer(
    help="Publication: evaluator reports, redaction commitments, embargo, public report pages.", no_args_is_help=True
)


# ---------------------------------------------------------------- evaluator side (HTTP)


def _call(method: str, path: str, **kwargs: Any) -> Any:
    """Call the lab's evaluator API (AIRLOCK_BASE_URL / AIRLOCK_API_KEY); errors become AirlockErrors."""
    from airlock.evals.client import LabClient

    return LabClient.from_env().send(method, path, **kwargs).json()


def _print_report(report: dict[str, Any]) -> None:
    console.print(f"report {report['id']}  [bold]{report['status']}[/]  revision {report['revision']}")
    console.print(f"  title: {report['title']}")
    console.print(f"  model: {report['model']}@{report['version']}  content hash: sha256:{report['content_hash']}")
    for r in report.get("redactions", []):
        state = f"revealed {r['revealed_at']}" if r.get("revealed_at") else "hidden"
        console.print(f"  redaction #{r['number']} ({r['reason'] or 'no reason'}): {r['commitment'][:16]}… {state}")
    embargo = report["embargo"]
    console.print(f"  embargo: {embargo['ends_at'] or 'no date'} ({embargo['rule']})")
    clock = report.get("clock") or {}
    if clock.get("publish_by") and report["status"] == "submitted":
        console.print(
            f"  published by {clock['publish_by']} at the latest ({clock['business_days']} business days, "
            f"{clock['calendar']} calendar, {len(clock['extensions'])} extension(s))"
        )
    release = report["release"]
    if release["requested_revision"] or release["agreed_revision"]:
        console.print(
            f"  early release: requested for r{release['requested_revision']}, "
            f"lab agreed for r{release['agreed_revision']}"
        )
    for c in report.get("comments", []):
        console.print(f"  lab comment by {c['author']} on r{c['revision']}: {c['body']}")
    if report["status"] == "published":
        console.print(f"  public at /public/reports/{report['id']} since {report['published_at']}")


def _title_of(text: str, path: Path) -> str:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem


@app.command("draft")
def draft(
    file: Annotated[Path, typer.Argument(help="Markdown file; [[redact:reason]]...[[/redact]] marks redactions.")],
    model: Annotated[str | None, typer.Option(help="Model version the report is about, `name@version`.")] = None,
    result: Annotated[list[str] | None, typer.Option(help="A cited result id (repeat for several).")] = None,
    plot: Annotated[list[Path] | None, typer.Option(help="A PNG plot to attach (repeat for several).")] = None,
    title: Annotated[str | None, typer.Option(help="Title (default: the first `# ` heading).")] = None,
    report: Annotated[str | None, typer.Option(help="Make a new revision of this report instead.")] = None,
) -> None:
    """Create a report draft, or a new revision of one (evaluator side)."""

    def body() -> None:
        from airlock.errors import InvalidRequestError

        text = file.read_text(encoding="utf-8")
        attachments = []
        for path in plot or []:
            with path.open("rb") as fh:
                uploaded = _call("POST", "/airlock/reports/attachments", files={"file": (path.name, fh, "image/png")})
            attachments.append(uploaded["id"])
        payload: dict[str, Any] = {"title": title or _title_of(text, file), "body": text}
        if result is not None:
            payload["result_ids"] = result
        if plot is not None:
            payload["attachment_ids"] = attachments
        if report:
            out = _call("PATCH", f"/airlock/reports/{report}", json=payload)
        else:
            if not model:
                raise InvalidRequestError("a new report needs --model name@version")
            out = _call("POST", "/airlock/reports", json={**payload, "model": model})
        _print_report(out)

    run_command(body)


@app.command("submit")
def submit(report_id: Annotated[str, typer.Argument(help="Report id.")]) -> None:
    """Freeze the current revision for the lab's review (evaluator side)."""
    run_command(lambda: _print_report(_call("POST", f"/airlock/reports/{report_id}/submit")))


@app.command("request-release")
def request_release(report_id: Annotated[str, typer.Argument(help="Report id.")]) -> None:
    """Ask to publish before the embargo ends; needs the lab's agreement too (evaluator side)."""
    run_command(lambda: _print_report(_call("POST", f"/airlock/reports/{report_id}/request-release")))


@app.command("reveal")
def reveal(
    report_id: Annotated[str, typer.Argument(help="Report id.")],
    number: Annotated[int, typer.Argument(help="Redaction number (#n of its placeholder).")],
) -> None:
    """Reveal a redacted span of a published report (evaluator side)."""
    run_command(
        lambda: _print_report(_call("POST", f"/airlock/reports/{report_id}/reveal", json={"redaction": number}))
    )


@app.command("show")
def show(
    report_id: Annotated[str, typer.Argument(help="Report id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the full JSON (includes salts).")] = False,
) -> None:
    """Show one of your reports (evaluator side)."""

    def body() -> None:
        out = _call("GET", f"/airlock/reports/{report_id}")
        if as_json:
            console.print_json(json.dumps(out))
        else:
            _print_report(out)

    run_command(body)


@app.command("mine")
def mine() -> None:
    """List your organisation's reports (evaluator side)."""

    def body() -> None:
        from rich.table import Table

        table = Table("id", "status", "rev", "model", "title", "published")
        for r in _call("GET", "/airlock/reports"):
            table.add_row(r["id"], r["status"], str(r["revision"]), r["model"], r["title"], r["published_at"] or "-")
        console.print(table)

    run_command(body)


# ---------------------------------------------------------------- lab side (database)


@app.command("list")
def lab_list(status: Annotated[str | None, typer.Option(help="submitted or published.")] = None) -> None:
    """List reports submitted for review and published ones (lab side)."""
    from rich.table import Table

    from airlock.publish import schemas, service

    def body() -> None:
        with open_database() as (_s, db), db.session() as session:
            table = Table("id", "status", "rev", "evaluator", "model", "title", "submitted", "published")
            table.columns[0].no_wrap = True
            for report in service.list_lab_reports(session, status):
                s = schemas.summary(session, report, lab=True)
                table.add_row(
                    s.id,
                    s.status,
                    str(s.revision),
                    s.evaluator,
                    s.model,
                    s.title,
                    fmt_ts(s.submitted_at),
                    fmt_ts(s.published_at),
                )
            console.print(table)

    run_command(body)


@app.command("comment")
def lab_comment(
    report_id: Annotated[str, typer.Argument(help="Report id.")],
    text: Annotated[str, typer.Argument(help="The comment (shown beside the report when public).")],
    author: Annotated[str, typer.Option("--as", help="Lab member writing it.")] = "lab",
) -> None:
    """Add a lab comment to a submitted report (lab side)."""
    from airlock.publish import service

    def body() -> None:
        with open_database() as (_s, db), db.session() as session:
            comment = service.add_comment(session, report_id, author, "admin", text)
            console.print(f"comment {comment.id} on {report_id} revision {comment.revision}")

    run_command(body)


@app.command("agree-release")
def lab_agree(
    report_id: Annotated[str, typer.Argument(help="Report id.")],
    author: Annotated[str, typer.Option("--as", help="Lab member agreeing.")] = "lab",
) -> None:
    """Agree to publish a submitted report before its embargo ends (lab side)."""
    from airlock.publish import service

    def body() -> None:
        with open_database() as (_s, db), db.session() as session:
            report = service.agree_release(session, report_id, f"cli:{author}")
            if report.status == "published":
                console.print(f"published {report.id} at /public/reports/{report.id} (both parties agreed)")
            else:
                console.print(f"agreed to release revision {report.release_agreed_revision}; waiting for the evaluator")

    run_command(body)


@app.command("extend")
def lab_extend(
    report_id: Annotated[str, typer.Argument(help="Report id.")],
    days: Annotated[int, typer.Option("--days", help="Business days added to the publication deadline.")],
    justification: Annotated[str, typer.Option(help="The exceptional circumstances (published with it).")],
    token: Annotated[
        str | None, typer.Option(envvar="AIRLOCK_ADMIN_TOKEN", help="The decider's admin token (required).")
    ] = None,
) -> None:
    """Extend a submitted report's publication clock in exceptional circumstances (decider; public)."""
    from airlock.access.roles import Permission
    from airlock.access.service import authenticate_admin
    from airlock.publish import service
    from airlock.publish.routes import publication_clock

    if not token:
        raise typer.BadParameter("an extension is the decider's: give their admin token (--token)")

    def body() -> None:
        with open_database() as (settings, db), db.session() as session:
            principal = authenticate_admin(session, token)
            # Acting for a token: its role counts, as over HTTP.
            principal.require(Permission.STAGE_CHANGE)
            row = service.extend_publication(
                session,
                report_id,
                business_days=days,
                justification=justification,
                decider=principal.name,
                role=principal.role,
                token_id=principal.token_id,
                clock=publication_clock(settings.policy_path),
            )
            console.print(
                f"extended {report_id} by {row.business_days} business day(s): published by "
                f"{row.new_deadline.isoformat()} at the latest (was {row.previous_deadline.isoformat()}); "
                "the extension and its justification are public (ledger event report.extended)"
            )

    run_command(body)


@app.command("publish-due")
def publish_due() -> None:
    """Publish every submitted report whose embargo or publication clock ran out (lab side; safe from cron)."""
    from airlock.publish import service

    def body() -> None:
        with open_database() as (_s, db), db.session() as session:
            ids = service.publish_due(session)
        for rid in ids:
            console.print(f"published {rid} at /public/reports/{rid}")
        console.print(f"{len(ids)} report(s) published")

    run_command(body)


# ---------------------------------------------------------------- anyone (offline checks)


@app.command("verify-reveal")
def verify_reveal(
    commitment: Annotated[str, typer.Option(help="The commitment (64 hex digits).")],
    salt: Annotated[str, typer.Option(help="The revealed salt (64 hex digits).")],
    text: Annotated[str | None, typer.Option(help="The revealed text.")] = None,
    text_file: Annotated[Path | None, typer.Option(help="Read the revealed text from a file (exact bytes).")] = None,
) -> None:
    """Check SHA-256(salt || UTF-8 text) equals the commitment."""
    from airlock.publish.redaction import verify_commitment

    if (text is None) == (text_file is None):
        raise typer.BadParameter("give exactly one of --text or --text-file")
    value = text_file.read_bytes().decode("utf-8") if text_file is not None else str(text)
    if not verify_commitment(commitment.lower(), salt.lower(), value):
        console.print("[bold red]MISMATCH[/]: the text and salt do not open this commitment")
        raise typer.Exit(1)
    console.print("OK: SHA-256(salt || text) equals the commitment")


@app.command("verify")
def verify(
    report: Annotated[str, typer.Argument(help="Report id (lab from AIRLOCK_BASE_URL), public URL or JSON file.")],
    evaluator_key: Annotated[
        list[str] | None,
        typer.Option(
            "--key",
            "--evaluator-key",
            help="The evaluator's public key (base64 or SHA-256 fingerprint; repeatable): every result must be signed "
            "by one; required when the report has signed results.",
        ),
    ] = None,
    unsafe_trust_embedded_keys: Annotated[
        bool, typer.Option(help="Trust the keys the report itself carries (unsafe: prints a warning).")
    ] = False,
) -> None:
    """Check a public report: content hash, commitments, every reveal and every result signature."""

    def body() -> None:
        import os

        import httpx

        from airlock.errors import InvalidRequestError
        from airlock.publish.service import verify_public_report

        if Path(report).is_file():
            raw = Path(report).read_bytes()
        else:
            url = report
            if not report.startswith(("http://", "https://")):
                base = os.environ.get("AIRLOCK_BASE_URL")
                if not base:
                    raise InvalidRequestError("give a URL or set AIRLOCK_BASE_URL (http://lab:8000/v1)")
                url = base.rstrip("/").removesuffix("/v1") + f"/public/reports/{report}"
            resp = httpx.get(url, timeout=60)
            if resp.status_code != 200:
                raise InvalidRequestError(f"GET {url}: HTTP {resp.status_code}")
            raw = resp.content
        try:
            data: Any = json.loads(raw)
        except ValueError as exc:
            console.print(f"[bold red]FAIL[/] not a JSON document: {escape(str(exc))}", highlight=False)
            raise typer.Exit(1) from None
        check = verify_public_report(data, evaluator_key, trust_embedded_keys=unsafe_trust_embedded_keys)
        if unsafe_trust_embedded_keys and not evaluator_key:
            console.print(
                "[bold yellow]WARNING[/] --unsafe-trust-embedded-keys: the report's own keys were trusted; "
                "anyone could have signed these results. Pin the evaluator's key with --key.",
                highlight=False,
            )
        for line in check.problems:
            console.print(f"[bold red]FAIL[/] {escape(line)}", highlight=False)
        if not check.ok:
            raise typer.Exit(1)
        for rid, fp in check.signers:
            console.print(f"  result {escape(rid)}: signature verified with key sha256:{fp}", highlight=False)
        pinned = " (pinned)" if evaluator_key else " (key NOT pinned)"
        console.print(
            escape(
                f"OK: {data.get('id')} content hash sha256:{data.get('content_hash')}, "
                f"{len(check.signers)} signed result(s){pinned if check.signers else ''}, "
                f"{check.revealed} revealed span(s) verified"
            ),
            highlight=False,
        )

    run_command(body)
