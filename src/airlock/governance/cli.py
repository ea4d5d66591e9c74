"""`airlock gate ...`: check the deployment gate, promote through it, override, history, trend, policy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from airlock.cli_support import console, fail, fmt_ts, open_database, run_command
from airlock.errors import AirlockError, InvalidRequestError
from airlock.ids import parse_version_ref

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from airlock.governance.policy import Policy
    from airlock.governance.service import Promotion
    from airlock.registry.models import Model, ModelVersion

app = typer.Typer(
    help="Governance: frontier-safety policy, safety case per mitigation, deployment gate, overrides.",
    no_args_is_help=True,
)
policy_app = typer.Typer(help="The frontier-safety policy file.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")
call_app = typer.Typer(help="Public calls for external evaluators, recorded in the ledger.", no_args_is_help=True)
app.add_typer(call_app, name="call")

EXIT_BLOCK = 1
EXIT_ERROR = 2
_VERDICT_STYLE = {"below": "green", "cannot_rule_out": "yellow", "crossed": "bold red"}
_STATUS_STYLE = {"ok": "green"}


def _split_ref(ref: str) -> tuple[str, str]:
    try:
        parsed = parse_version_ref(ref, require_version=True)
    except InvalidRequestError:
        raise fail(f"{ref!r} is not of the form MODEL@VERSION", EXIT_ERROR) from None
    assert parsed.version is not None
    return parsed.model, parsed.version


def _lookup(session: Session, ref: str) -> tuple[Model, ModelVersion]:
    from airlock.registry.service import get_model, get_version

    name, label = _split_ref(ref)
    model = get_model(session, name)
    return model, get_version(session, model, label)


def _load_policy(path: Path | None = None) -> Policy:
    from airlock.config import get_settings
    from airlock.governance.policy import load_policy

    return load_policy(path or get_settings().policy_path)


def _fmt_evidence(e: dict[str, Any]) -> str:
    lo, hi = e["ci95"]
    ft = ", fine-tuned" if e["fine_tuned"] else ""
    inherited = f", from {e['version']}" if e["inherited"] else ""
    return (
        f"{e['value']:.3f} [{lo:.3f}, {hi:.3f}] n={e['n']} {e['variant']}, {e['epochs']} ep{ft}{inherited} "
        f"({e['result_id']})"
    )


def render_report(report: dict[str, Any]) -> None:
    """Print a gate report as tables: per-domain verdicts, the safety case, the decision."""
    console.print(
        f"[bold]gate[/] {report['model']}@{report['version']} ({report['version_hash'][:12]}…) "
        f"{report['current_stage']} -> {report['target_stage']}"
        f"{'' if report['gate_required'] else ' (stage not gated by the policy)'}; "
        f"policy {report['policy']['name']!r} {report['policy']['sha256'][:12]}…"
    )
    table = Table("domain", "verdict", "threshold / eval", "line / threshold", "evidence (95% CI)", "why")
    for d in report["domains"]:
        domain = f"{d['id']} ({d['status']})" + (" [red]blocks[/]" if d["blocks"] else "")
        for t in d["thresholds"]:
            for ev in t["evals"]:
                evidence = "\n".join(_fmt_evidence(e) for e in ev["evidence"]) or "-"
                if ev["excluded"]:
                    evidence += "\n" + "\n".join(
                        f"[dim]excluded {x['result_id']}: {x['reason']}[/]" for x in ev["excluded"]
                    )
                style = _VERDICT_STYLE[ev["verdict"]]
                table.add_row(
                    domain,
                    f"[{style}]{ev['verdict']}[/]",
                    f"{t['id']}: {ev['suite']}:{ev['metric']}",
                    f"{ev['early_warning_line']:g} / {ev['threshold']:g}",
                    evidence,
                    ev["reason"],
                )
                domain = ""
            for sg in t["required_safeguards"]:
                mark = "[green]met[/]" if sg["met"] else "[red]not met[/]"
                table.add_row("", "", f"safeguard {sg['id']}", "", mark, sg["reason"])
    console.print(table)
    cases = Table("variant", "mitigation", "kind", "stance", "status", "evidence / why")
    for c in report["safety_case"]:
        style = _STATUS_STYLE.get(c["status"], "red")
        detail = "\n".join(
            f"{e['value']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}] n={e['n']} ({e['result_id']})"
            for e in c.get("evidence", [])
        )
        cases.add_row(
            c["variant"],
            c["mitigation"],
            c["kind"],
            c["stance"] or "[red]UNSET[/]",
            f"[{style}]{c['status']}[/]",
            (detail + "\n" if detail else "") + c["reason"],
        )
    if report["safety_case"]:
        console.print(cases)
    for r in report["ignored_results"]:
        console.print(f"[yellow]ignored[/] {r['result_id']}: {r['reason']}")
    if report["decision"] == "allow":
        console.print("[bold green]ALLOW[/]")
    else:
        console.print("[bold red]BLOCK[/]")
        for reason in report["blocking"]:
            console.print(f"  - {reason}")
    console.print(f"report sha256 {report['report_sha256']}")


@app.command("check")
def check(
    ref: Annotated[str, typer.Argument(help="MODEL@VERSION")],
    stage: Annotated[str, typer.Option(help="Target stage: external-candidate, deployed or internal.")] = "deployed",
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report instead of tables.")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON report to this file.")] = None,
    policy: Annotated[
        Path | None, typer.Option(help="Policy file (default AIRLOCK_POLICY or <home>/policy.yaml).")
    ] = None,
) -> None:
    """Evaluate the policy against verified results; exit 0 only when the gate allows."""
    from airlock.governance.service import evaluate_gate

    if stage not in ("external-candidate", "deployed", "internal"):
        raise fail("--stage must be external-candidate, deployed or internal", EXIT_ERROR)
    try:
        parsed = _load_policy(policy)
        with open_database() as (_settings, db), db.session() as session:
            model, version = _lookup(session, ref)
            report = evaluate_gate(session, model, version, stage, parsed)
    except AirlockError as exc:
        raise fail(exc.message, EXIT_ERROR) from None
    text = json.dumps(report, indent=2, sort_keys=True)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    if as_json:
        print(text)
    else:
        render_report(report)
    raise typer.Exit(0 if report["decision"] == "allow" else EXIT_BLOCK)


@app.command("promote")
def promote(
    ref: Annotated[str, typer.Argument(help="MODEL@VERSION")],
    stage: Annotated[str, typer.Option(help="Target stage.")],
    override: Annotated[bool, typer.Option("--override", help="Promote despite a blocking gate (decider).")] = False,
    decider: Annotated[str | None, typer.Option(help="The decider's name (must match the token).")] = None,
    justification: Annotated[str | None, typer.Option(help="Why the override is acceptable (recorded).")] = None,
    token: Annotated[
        str | None,
        typer.Option(envvar="AIRLOCK_ADMIN_TOKEN", help="Admin token of the person acting (decider for overrides)."),
    ] = None,
) -> None:
    """Move a version to a stage through the gate; refused (exit 1) while the gate blocks."""
    from airlock.access.roles import Permission
    from airlock.access.service import authenticate_admin
    from airlock.governance.service import OverrideRequest, active_policy
    from airlock.governance.service import promote as do_promote

    if stage not in ("training-checkpoint", "internal", "external-candidate", "deployed"):
        raise fail("--stage must be training-checkpoint, internal, external-candidate or deployed", EXIT_ERROR)
    if override and (not decider or not justification or not token):
        raise fail("--override needs --decider, --justification and the decider's admin token (--token)", EXIT_ERROR)

    def body() -> Promotion:
        with open_database() as (settings, db):
            policy = active_policy(settings.policy_path)
            with db.session() as session:
                principal = authenticate_admin(session, token) if token else None
                if principal is not None:  # acting for a token: its role counts, as over HTTP
                    principal.require(Permission.STAGE_CHANGE)
                request = None
                if override:
                    assert principal is not None and justification is not None
                    if principal.name != decider:
                        raise fail(f"the token belongs to {principal.name!r}, not {decider!r}", EXIT_ERROR)
                    request = OverrideRequest(principal.name, principal.role, justification, principal.token_id)
                _model, version = _lookup(session, ref)
                actor = principal.name if principal else "cli"
                outcome = do_promote(
                    session,
                    version,
                    stage,
                    actor=actor,
                    policy=policy,
                    policy_path=settings.policy_path,
                    override=request,
                )
            return outcome

    outcome = run_command(body)
    if outcome.promoted:
        console.print(f"[green]promoted[/] {outcome.message}")
        if outcome.override is not None:
            console.print(f"override {outcome.override.id} recorded (decision {outcome.override.decision_id})")
        return
    console.print(f"[bold red]refused[/] {outcome.message}")
    raise typer.Exit(EXIT_BLOCK)


@app.command("history")
def history(ref: Annotated[str, typer.Argument(help="MODEL@VERSION")]) -> None:
    """List a version's gate decisions at promotion attempts, with overrides."""
    from airlock.governance.service import history as load_history

    def body() -> None:
        with open_database() as (_settings, db), db.session() as session:
            _model, version = _lookup(session, ref)
            table = Table("time", "decision", "stages", "actor", "promoted", "override", "report sha256")
            for d, o in load_history(session, version):
                table.add_row(
                    fmt_ts(d.created_at),
                    f"{d.id} [{'green' if d.decision == 'allow' else 'red'}]{d.decision}[/]",
                    f"{d.from_stage} -> {d.stage}",
                    d.actor,
                    "yes" if d.promoted else "no",
                    f"{o.id} by {o.decider} ({o.decider_role}): {o.justification}" if o else "-",
                    d.report_sha256[:16] + "…",
                )
            console.print(table)

    run_command(body)


@app.command("trend")
def trend(
    model: Annotated[str, typer.Argument(help="MODEL")],
    out: Annotated[Path | None, typer.Option(help="PNG path (default <home>/gate/<model>-trend.png).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the trend data as JSON.")] = False,
) -> None:
    """Plot each domain's metric across versions with threshold and early-warning lines (PNG + table)."""
    from airlock.governance.service import plot_trend
    from airlock.governance.service import trend as load_trend
    from airlock.registry.service import get_model

    def body() -> tuple[dict[str, Any], Path]:
        policy = _load_policy()
        with open_database() as (settings, db), db.session() as session:
            data = load_trend(session, get_model(session, model), policy)
        path = plot_trend(data, out or settings.home_dir / "gate" / f"{model}-trend.png")
        return data, path

    data, path = run_command(body)
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    table = Table(
        "domain / threshold", "eval", "line / threshold", *[p["version"] for p in data["series"][0]["points"]]
    )
    for s in data["series"]:
        cells = [
            f"{p['value']:.3f} [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}] {p['verdict']}"
            if p["value"] is not None
            else "-"
            for p in s["points"]
        ]
        table.add_row(
            f"{s['domain']} / {s['threshold_id']}",
            f"{s['suite']}:{s['metric']}",
            f"{s['early_warning_line']:g} / {s['threshold']:g}",
            *cells,
        )
    console.print(table)
    for s in data["series"]:
        extrapolation = s["extrapolation"]
        if extrapolation and extrapolation["warning"]:
            console.print(
                f"[yellow]warning[/] {s['domain']}/{s['threshold_id']}: {extrapolation['warning']} "
                f"(predicted {extrapolation['predicted_next']:.3f}; {extrapolation['method']})"
            )
    console.print(f"plot: {path}")


@policy_app.command("validate")
def policy_validate(
    file: Annotated[
        Path | None, typer.Argument(help="Policy file (default AIRLOCK_POLICY or <home>/policy.yaml).")
    ] = None,
) -> None:
    """Validate a policy file and summarise it; every problem is listed with its location."""

    def body() -> None:
        from airlock.config import get_settings

        path = file or get_settings().policy_path
        policy = _load_policy(path)
        console.print(f"[green]valid[/] {path}: {policy.name!r} (sha256 {policy.sha256()[:16]}…)")
        console.print(f"gated stages: {', '.join(policy.gate.stages)}; decider role: {policy.roles.decides}")
        for d in policy.domains:
            evals = ", ".join(f"{e.suite}:{e.metric}>={e.threshold:g}" for t in d.thresholds for e in t.evals)
            console.print(f"  {d.id} ({d.status}): {len(d.thresholds)} threshold(s): {evals}")

    run_command(body)


# ---------------------------------------------------------------- public calls for evaluators


@call_app.command("open")
def call_open(
    ref: Annotated[str, typer.Argument(help="MODEL@VERSION the call is for.")],
    text: Annotated[str, typer.Option(help="The public text of the call.")],
    actor: Annotated[str, typer.Option(help="Who opens it (committed in the ledger).")] = "lab",
) -> None:
    """Open a public call for evaluators (a `call.opened` ledger event)."""

    def body() -> None:
        from airlock.governance.calls import open_call

        with open_database() as (_settings, db), db.session() as session:
            _model, version = _lookup(session, ref)
            call_id = open_call(session, version, text, actor)
        console.print(f"opened call {call_id} for {ref}")

    run_command(body)


@call_app.command("apply")
def call_apply(
    call_id: Annotated[str, typer.Argument(help="The call's id.")],
    applicant: Annotated[str, typer.Option(help="The applicant (committed, not published).")],
    reason: Annotated[str, typer.Option(help="Why the applicant is or is not qualified (public).")],
    qualified: Annotated[bool, typer.Option(help="Whether the applicant is a qualified evaluator.")] = False,
    actor: Annotated[str, typer.Option(help="Who assessed it (committed).")] = "lab",
) -> None:
    """Record an application and its assessment (a `call.application` ledger event)."""

    def body() -> None:
        from airlock.governance.calls import record_application

        with open_database() as (_settings, db), db.session() as session:
            record_application(session, call_id, applicant, qualified=qualified, reason=reason, actor=actor)
        console.print(f"recorded a {'qualified' if qualified else 'not qualified'} application to {call_id}")

    run_command(body)


@call_app.command("close")
def call_close(
    call_id: Annotated[str, typer.Argument(help="The call's id.")],
    actor: Annotated[str, typer.Option(help="Who closes it (committed).")] = "lab",
) -> None:
    """Close a call (a `call.closed` ledger event with its counts)."""

    def body() -> None:
        from airlock.governance.calls import close_call

        with open_database() as (_settings, db), db.session() as session:
            call = close_call(session, call_id, actor)
        console.print(f"closed {call_id}: {call.applications} application(s), {call.qualified} qualified")

    run_command(body)
