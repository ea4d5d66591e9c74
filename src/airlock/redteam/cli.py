"""`airlock redteam ...`: a red-teamer's sessions over HTTP; the lab's findings list and triage on the database."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from airlock.cli_support import console, fmt_ts, open_database, run_command

app = typer.Typer(help="Red-teaming: sessions with granted variants, findings, triage.", no_args_is_help=True)


def _call(method: str, path: str, **kwargs: Any) -> Any:
    """Call the lab's evaluator API (AIRLOCK_BASE_URL / AIRLOCK_API_KEY); errors become AirlockErrors."""
    from airlock.evals.client import LabClient

    return LabClient.from_env().send(method, path, **kwargs).json()


@app.command("ask")
def ask(
    prompt: Annotated[str, typer.Argument(help="The prompt, sent to every variant of the session.")],
    models: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="Start a new session with this model id (twice: side by side)."),
    ] = None,
    session_id: Annotated[str | None, typer.Option("--session", help="Continue this session.")] = None,
) -> None:
    """Send one prompt in a red-teaming session (a new one with --model, or --session ID)."""

    def body() -> None:
        sid = session_id
        if sid is None:
            if not models:
                raise typer.BadParameter("give --session ID or at least one --model")
            sid = _call("POST", "/v1/airlock/redteam/sessions", json={"models": models})["id"]
            console.print(f"session {sid}")
        turn = _call("POST", f"/v1/airlock/redteam/sessions/{sid}/turns", json={"content": prompt})
        for r in turn["responses"]:
            blocked = " [red](blocked)[/]" if r["blocked"] else ""
            console.print(f"[bold]{escape(r['variant'])}[/]{blocked}: {escape(r['content'])}")
        console.print(f"turn {turn['index']} of session {sid}")

    run_command(body)


@app.command("flag")
def flag(
    session_id: Annotated[str, typer.Argument(help="Your session.")],
    turn: Annotated[int, typer.Option(help="The turn's index.")],
    severity: Annotated[str, typer.Option(help="low, medium, high or critical.")],
    category: Annotated[str, typer.Option(help="bio, chem, cyber, autonomy, persuasion or other.")],
    title: Annotated[str, typer.Option(help="One line.")],
    notes: Annotated[str, typer.Option(help="How to reproduce it.")] = "",
    variant: Annotated[str | None, typer.Option(help="Which variant's answer (default: the first).")] = None,
) -> None:
    """Flag one answer of your session as a finding (red-teamer side)."""

    def body() -> None:
        payload = {
            "turn": turn,
            "severity": severity,
            "category": category,
            "title": title,
            "notes": notes,
            "variant": variant,
        }
        finding = _call("POST", f"/v1/airlock/redteam/sessions/{session_id}/findings", json=payload)
        console.print(f"finding {finding['id']} ({finding['severity']}, {finding['category']}) on {finding['variant']}")

    run_command(body)


@app.command("hours")
def hours() -> None:
    """Show your red-teaming hours on the grant (red-teamer side)."""

    def body() -> None:
        h = _call("GET", "/v1/airlock/redteam/hours")
        console.print(f"{h['used']:.2f} of {h['granted']:g} hours used, {h['left']:.2f} left")

    run_command(body)


@app.command("findings")
def findings(
    model: Annotated[str | None, typer.Option(help="Only this model's findings.")] = None,
    status: Annotated[str | None, typer.Option(help="open, acknowledged, disputed or fixed.")] = None,
) -> None:
    """List red-teaming findings for triage (lab side)."""
    from airlock.redteam import service

    def body() -> None:
        with open_database() as (_s, db), db.session() as session:
            rows = service.list_findings(session, model=model, status=status)
            table = Table("finding", "severity", "category", "variant", "status", "title", "flagged")
            for f in rows:
                table.add_row(f.id, f.severity, f.category, f.variant, f.status, escape(f.title), fmt_ts(f.created_at))
            console.print(table)

    run_command(body)


@app.command("triage")
def triage(
    finding_id: Annotated[str, typer.Argument(help="Finding id.")],
    status: Annotated[str, typer.Argument(help="acknowledged, disputed or fixed.")],
    reason: Annotated[str, typer.Option(help="Why (required to dispute).")] = "",
    fixed_in: Annotated[str | None, typer.Option(help="For fixed: the later version's label.")] = None,
    author: Annotated[str, typer.Option("--as", help="Lab member triaging.")] = "lab",
) -> None:
    """Acknowledge, dispute or mark fixed a finding (lab side, operator's CLI)."""
    from airlock.redteam import service

    def body() -> None:
        with open_database() as (_s, db), db.session() as session:
            row = service.triage_finding(
                session, finding_id, service.Triage(status, reason, fixed_in), actor=f"cli:{author}", role="operator"
            )
            console.print(f"finding {row.id} is now {row.status}")

    run_command(body)
