"""The ``airlock`` command line: set up a lab, issue grants and keys, serve, read the audit trail."""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from airlock.access import cli as sealed_cli
from airlock.cli_support import (
    console,
    err,
    fail,
    fmt_ts,
    open_database,
    openai_client,
    run_command,
    summary_table,
)
from airlock.config import get_settings, reset_settings
from airlock.contamination import cli as contamination_cli
from airlock.db import Database
from airlock.errors import AirlockError
from airlock.governance import cli as governance_cli
from airlock.interp import cli as interp_cli
from airlock.leak import cli as leak_cli
from airlock.ledger import cli as ledger_cli
from airlock.publish import cli as publish_cli
from airlock.redteam import cli as redteam_cli

app = typer.Typer(help="Airlock: structured pre-deployment access for external evaluators.", no_args_is_help=True)
evaluator_app = typer.Typer(help="Evaluator organisations.", no_args_is_help=True)
grant_app = typer.Typer(help="Grants: what an evaluator may do with which variants.", no_args_is_help=True)
key_app = typer.Typer(help="Evaluator API keys.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit trail of every request.", no_args_is_help=True)
models_app = typer.Typer(help="Models, versions and variants in the registry.", no_args_is_help=True)
admin_app = typer.Typer(help="Lab admin tokens for the admin API.", no_args_is_help=True)
finetune_app = typer.Typer(help="Evaluator side: fine-tune granted variants lab-side.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluator side: run suites, sign and submit results, compare.", no_args_is_help=True)
app.add_typer(evaluator_app, name="evaluator")
app.add_typer(grant_app, name="grant")
app.add_typer(key_app, name="key")
app.add_typer(audit_app, name="audit")
app.add_typer(models_app, name="models")
app.add_typer(admin_app, name="admin")
app.add_typer(eval_app, name="eval")
app.add_typer(finetune_app, name="finetune")
app.add_typer(interp_cli.app, name="interp")
app.add_typer(governance_cli.app, name="gate")
app.add_typer(ledger_cli.app, name="ledger")
app.add_typer(ledger_cli.witness_app, name="witness")
app.add_typer(leak_cli.app, name="leak")
app.add_typer(publish_cli.app, name="report")
app.add_typer(redteam_cli.app, name="redteam")
app.add_typer(contamination_cli.app, name="contamination")
app.add_typer(sealed_cli.app, name="sealed")

T = TypeVar("T")


def _print_version(value: bool) -> None:
    if value:
        from airlock import __version__

        console.print(f"airlock {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the installed version and exit.", callback=_print_version, is_eager=True),
    ] = False,
) -> None:
    """Airlock: structured pre-deployment access for external evaluators."""


@app.command("model-report")
def model_report(
    target: Annotated[str, typer.Argument(help="MODEL@VERSION (label or content-hash prefix).")],
    fmt: Annotated[str, typer.Option("--format", help="md or json.")] = "md",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write to this file instead of stdout.")] = None,
) -> None:
    """Write the Model Report's external-evaluation section, every statement proven from the ledger."""

    def body() -> None:
        from airlock.ids import parse_version_ref
        from airlock.ledger.model_report import render_markdown
        from airlock.ledger.reporting import build_model_report

        if fmt not in ("md", "json"):
            raise fail("--format is md or json")
        ref = parse_version_ref(target, require_version=True)
        assert ref.version is not None
        with open_database() as (settings, db):
            report = build_model_report(db, settings, ref.model, ref.version)
        text = render_markdown(report) if fmt == "md" else json.dumps(report, indent=1, ensure_ascii=False) + "\n"
        if out is None:
            typer.echo(text, nl=False)
        else:
            out.write_text(text)
            console.print(
                f"wrote {out}: {len(report['statements'])} statements citing {len(report['entries'])} entries"
            )

    run_command(body)


# ---------------------------------------------------------------- setup


def starter_manifest() -> str:
    """Return the starter ``airlock.yaml`` declaring the embedded model."""
    return resources.files("airlock").joinpath("data/starter-airlock.yaml").read_text()


@app.command()
def init(
    force: Annotated[bool, typer.Option(help="Overwrite an existing airlock.yaml.")] = False,
    admin_token: Annotated[bool, typer.Option(help="Create a lab admin token if none exists.")] = True,
) -> None:
    """Create the data dir, the database and a starter airlock.yaml for the embedded model."""
    from sqlalchemy import select

    from airlock.access.models import AdminToken
    from airlock.access.service import create_admin_token

    def body() -> None:
        with open_database() as (settings, db):
            settings.home_dir.mkdir(parents=True, exist_ok=True)
            path = settings.manifest_path
            if path.exists() and not force:
                console.print(f"kept existing manifest {path}")
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(starter_manifest())
                console.print(f"wrote starter manifest {path}")
            policy_path = settings.policy_path
            if policy_path.exists():
                console.print(f"kept existing policy {policy_path}")
            else:
                policy_path.parent.mkdir(parents=True, exist_ok=True)
                policy_path.write_text(resources.files("airlock").joinpath("data/example-policy.yaml").read_text())
                console.print(f"wrote example frontier-safety policy {policy_path} (see docs/governance.md)")
            console.print(f"database {settings.db_url}")
            from airlock.access.seal import prepare_grant_seals

            sealer = prepare_grant_seals(db, settings)
            console.print(f"grant seal key {sealer.key.source} (id {sealer.key_id}; keep it apart from the database)")
            if admin_token:
                with db.session() as session:
                    if session.scalar(select(AdminToken).where(AdminToken.revoked_at.is_(None))) is None:
                        _row, token = create_admin_token(session, "initial-admin")
                        token_file = settings.home_dir / "admin-token"
                        token_file.write_text(token + "\n")
                        token_file.chmod(0o600)
                        console.print(f"admin token (saved to {token_file}, mode 600): [bold]{token}[/]")
            console.print("next: [bold]airlock serve[/]")

    run_command(body)


@app.command()
def migrate(
    check: Annotated[
        bool, typer.Option("--check", help="Only report; exit 1 when migrations are pending (for CI and probes).")
    ] = False,
) -> None:
    """Bring the database schema to this release's head (run once per upgrade, before serve and worker start)."""
    from airlock.migrations import schema_state

    def body() -> None:
        with open_database(migrate=False) as (_settings, db):
            state = schema_state(db.engine)
            where = db.engine.url.render_as_string(hide_password=True)
            if state.ahead:
                raise AirlockError(f"{where} is at revision {state.current}, newer than this release ({state.head})")
            if state.at_head:
                console.print(f"{where}: schema at {state.head} (head), nothing to migrate")
                return
            if check:
                console.print(f"{where}: at {state.current or 'none'}, pending: {', '.join(state.pending)}")
                raise typer.Exit(1)
            console.print(
                f"{where}: migrating {state.current or 'empty'} → {state.head} ({len(state.pending)} step(s))"
            )
            db.migrate()
            console.print(f"{where}: schema at {state.head} (head)")

    run_command(body)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind (default AIRLOCK_HOST or 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default AIRLOCK_PORT or 8000).")] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
    workers: Annotated[
        int, typer.Option(min=1, help="Gateway processes sharing the port (more than one needs AIRLOCK_REDIS_URL).")
    ] = 1,
    access_log: Annotated[
        bool | None,
        typer.Option(help="Log every HTTP request (default AIRLOCK_ACCESS_LOG, off: the audit trail records them)."),
    ] = None,
) -> None:
    """Sync airlock.yaml into the registry and serve the gateway (run `airlock migrate` first)."""
    import uvicorn

    from airlock.app import bootstrap, create_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))
    settings = get_settings()
    if workers > 1 and not settings.redis_url:
        # Per-minute limits counted in each process would let N times the quota through.
        raise typer.BadParameter("more than one worker needs AIRLOCK_REDIS_URL, so quotas are counted once")
    db = Database(settings.db_url)
    # Start-up progress goes to stderr whatever the log level: the first start converts and loads weights.
    err.print(f"start-up: checking the schema of {db.engine.url.render_as_string(hide_password=True)}")
    # Sync before binding the port, so a bad manifest fails the start with a clear message.
    run_command(lambda: bootstrap(settings, db))
    err.print("start-up: registry synced from the manifest")
    run_command(lambda: prepare_local_weights(db))
    err.print(
        f"start-up: serving on {host or settings.host}:{port or settings.port}; weights load in the background "
        "(/healthz answers now, /readyz turns 200 once every backend is loaded)"
    )
    from airlock.web.server import CoalescingHttpToolsProtocol

    options: dict[str, Any] = {
        "host": host or settings.host,
        "port": port or settings.port,
        # uvicorn's httptools protocol, each response leaving in one write (airlock.web.server)
        "http": CoalescingHttpToolsProtocol,
        "log_level": log_level,
        "access_log": settings.access_log if access_log is None else access_log,
        "timeout_graceful_shutdown": 10,
    }
    if workers > 1:
        db.dispose()
        # Each worker process builds its own app (and database pool) from the same settings.
        uvicorn.run("airlock.app:worker_app", factory=True, workers=workers, **options)
        return
    uvicorn.run(create_app(settings, db=db, sync_manifest=False, load_weights=True), **options)


@app.command()
def worker(
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Run job workers (fine-tuning, interp) without the HTTP server; stop with Ctrl-C or SIGTERM."""
    import asyncio
    import signal

    from airlock.app import backend_pool, job_executor, job_handlers, prime_warm_runners
    from airlock.jobs.runner import JobRunner

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    db = Database(settings.db_url)
    run_command(db.require_migrated)

    async def work() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        pool = backend_pool(settings)
        handlers = job_handlers(settings, db, pool, loop)
        executor = job_executor(settings, db)
        runner = JobRunner(db, handlers, stale_after=settings.job_stale_after_s, executor=executor)
        runner.start()
        prime_warm_runners(handlers, executor)
        err.print(f"worker: running jobs from {db.engine.url.render_as_string(hide_password=True)}; Ctrl-C stops")
        try:
            await stop.wait()
        finally:
            err.print("worker: stopping (running jobs are checkpointed or requeued)")
            await asyncio.to_thread(runner.stop)
            await pool.aclose()
            db.dispose()

    asyncio.run(work())


def prepare_local_weights(db: Database) -> None:
    """Convert every GGUF a local variant serves before the first request needs it (slow once)."""
    from sqlalchemy import select

    from airlock.registry.models import Variant

    with db.session() as session:
        specs = sorted(
            {str(v.backend_config.get("model")) for v in session.scalars(select(Variant)) if v.backend == "local"}
        )
    for spec in specs:
        if spec.startswith("tiny-random") or spec == "None":
            continue
        from airlock.backends.weights import converted_model_dir, resolve_model_spec

        if resolve_model_spec(spec).kind == "hf-dir":
            continue
        with console.status(f"preparing weights of {spec} (converted once, then cached)"):
            path = converted_model_dir(spec)
        console.print(f"weights of {spec}: {path}")


# ---------------------------------------------------------------- models


@models_app.command("list")
def models_list() -> None:
    """List models, versions, variants and mitigation stances."""
    from airlock.registry.service import list_models

    with open_database() as (_settings, db), db.session() as session:
        table = Table("model@version", "stage", "hash", "variant", "backend", "mitigations (stance)")
        for model in list_models(session):
            for version in model.versions:
                for variant in version.variants:
                    mitigations = ", ".join(f"{m.name} ({m.stance or 'UNSET'})" for m in variant.mitigations) or "-"
                    table.add_row(
                        f"{model.name}@{version.label}",
                        version.stage,
                        version.content_hash[:12],
                        variant.name,
                        variant.backend,
                        mitigations,
                    )
        console.print(table)


@models_app.command("sync")
def models_sync(
    manifest: Annotated[Path | None, typer.Argument(help="Manifest file (default: the data dir's).")] = None,
) -> None:
    """Sync a manifest into the registry without serving."""
    from airlock.governance.service import refuse_gated_manifest_stages
    from airlock.mitigations import check_manifest
    from airlock.registry.service import load_manifest, sync_manifest

    def body() -> None:
        with open_database() as (settings, db):
            parsed = load_manifest(manifest or settings.manifest_path)
            check_manifest(parsed)
            with db.session() as session:
                refuse_gated_manifest_stages(session, parsed, settings.policy_path)
                report = sync_manifest(session, parsed, actor="cli")
        for line in report.created:
            console.print(f"[green]created[/] {line}")
        for line in report.updated:
            console.print(f"[yellow]updated[/] {line}")
        console.print(f"{len(report.unchanged)} unchanged")

    run_command(body)


# ---------------------------------------------------------------- evaluators


@evaluator_app.command("add")
def evaluator_add(
    name: Annotated[str, typer.Argument(help="Organisation name (unique).")],
    contact: Annotated[str, typer.Option(help="Contact address.")] = "",
) -> None:
    """Register an evaluator organisation."""
    from airlock.access.service import create_evaluator

    def body() -> None:
        with open_database() as (_s, db), db.session() as session:
            evaluator = create_evaluator(session, name, contact)
            console.print(f"evaluator {evaluator.name} ({evaluator.id})")

    run_command(body)


@evaluator_app.command("list")
def evaluator_list() -> None:
    """List evaluator organisations."""
    from airlock.access.service import list_evaluators

    with open_database() as (_s, db), db.session() as session:
        table = Table("id", "name", "contact", "created")
        table.columns[0].no_wrap = True
        for e in list_evaluators(session):
            table.add_row(e.id, e.name, e.contact, fmt_ts(e.created_at))
        console.print(table)


@evaluator_app.command("keygen")
def evaluator_keygen(
    out: Annotated[Path | None, typer.Option(help="Where to write the private key (PEM, mode 600).")] = None,
    register: Annotated[
        bool, typer.Option(help="Register the public key with the lab (AIRLOCK_BASE_URL / AIRLOCK_API_KEY).")
    ] = False,
) -> None:
    """Create the Ed25519 key that signs your results and acceptances, and the X25519 key content is sealed to.

    Both are evaluator-side secrets: the signing key (PEM) and, beside it, ``seal.key`` (raw 32
    bytes, base64), each mode 600. Existing keys are kept.
    """
    from airlock.evals.attestation import fingerprint, generate_key, load_private_key, public_key_b64
    from airlock.evals.client import (
        LabClient,
        default_key_path,
        default_seal_key_path,
        generate_seal_key,
        load_seal_key,
        seal_public_key_b64,
    )

    def body() -> None:
        path = out or default_key_path()
        if path.exists():
            key = load_private_key(path)
            console.print(f"using existing key {path}")
        else:
            key = generate_key(path)
            console.print(f"wrote private key {path} (mode 600; keep it secret)")
        seal_path = default_seal_key_path(path)
        if seal_path.exists():
            seal = load_seal_key(seal_path)
            console.print(f"using existing sealing key {seal_path}")
        else:
            seal = generate_seal_key(seal_path)
            console.print(f"wrote sealing key {seal_path} (mode 600; sealed content opens only with it)")
        public = public_key_b64(key)
        console.print(f"public key: {public}")
        console.print(f"fingerprint: {fingerprint(public)}")
        console.print(f"seal public key: {seal_public_key_b64(seal)}")
        if register:
            LabClient.from_env().register_key(public)
            console.print("registered with the lab")

    run_command(body)


@evaluator_app.command("add-signing-key")
def evaluator_add_signing_key(
    name: Annotated[str, typer.Argument(help="Evaluator name or id.")],
    public_key: Annotated[str, typer.Argument(help="Base64 raw Ed25519 public key.")],
) -> None:
    """Register an evaluator's public signing key (lab side, e.g. received out of band)."""
    from airlock.access.service import get_evaluator
    from airlock.evals.service import register_signing_key

    def body() -> None:
        with open_database() as (_s, db), db.session() as session:
            row = register_signing_key(session, get_evaluator(session, name).id, public_key, registered_by="cli")
            console.print(f"registered {row.fingerprint[:16]}… for {name}")

    run_command(body)


# ---------------------------------------------------------------- grants


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


@grant_app.command("create")
def grant_create(
    evaluator: Annotated[str, typer.Option(help="Evaluator name or id.")],
    model: Annotated[str, typer.Option(help="Model name, optionally name@version (default: latest version).")],
    variants: Annotated[str, typer.Option(help="Comma-separated variant names.")],
    scopes: Annotated[str, typer.Option(help="Comma-separated: sample,logprobs,finetune,interp,redteam.")] = "sample",
    expires: Annotated[str | None, typer.Option(help="Validity from now, e.g. 30d, 12h.")] = None,
    not_before: Annotated[datetime | None, typer.Option(help="Start of validity (UTC).")] = None,
    versions: Annotated[str | None, typer.Option(help="Comma-separated version labels.")] = None,
    rpm: Annotated[int | None, typer.Option(help="Quota: requests per minute.")] = None,
    tokens: Annotated[int | None, typer.Option(help="Quota: total tokens.")] = None,
    ft_jobs: Annotated[int | None, typer.Option(help="Quota: fine-tuning jobs.")] = None,
    trained_tokens: Annotated[int | None, typer.Option(help="Quota: tokens trained on, all jobs.")] = None,
    file_bytes: Annotated[int | None, typer.Option(help="Quota: bytes of training files held.")] = None,
    interp_cpu_seconds: Annotated[float | None, typer.Option(help="Quota: interp sandbox CPU-seconds.")] = None,
    result_bytes: Annotated[int | None, typer.Option(help="Quota: bytes of interp results.")] = None,
    interp_full_logits: Annotated[
        bool, typer.Option(help="Let interp return full-vocabulary logits (default: top-k and named token ids).")
    ] = False,
    interp_served_bytes: Annotated[
        int | None, typer.Option(help="Quota: bytes interp jobs may be served (default: relative to the model).")
    ] = None,
    interp_review_served_bytes: Annotated[
        int | None, typer.Option(help="Served bytes past which interp results wait for review.")
    ] = None,
    embargo_days: Annotated[int | None, typer.Option(help="Publication embargo, days after deployment.")] = None,
    term: Annotated[
        list[str] | None,
        typer.Option(help="Any grant term as NAME=VALUE (repeatable; VALUE as JSON, else text); see `grant terms`."),
    ] = None,
    notes: Annotated[str, typer.Option(help="Free-text notes.")] = "",
) -> None:
    """Issue a grant; prints its id."""
    from airlock.access.service import GrantRequest, create_grant, parse_duration
    from airlock.db import utcnow

    shortcuts: dict[str, Any] = {
        "quota_requests_per_minute": rpm,
        "quota_total_tokens": tokens,
        "quota_finetune_jobs": ft_jobs,
        "quota_trained_tokens": trained_tokens,
        "quota_file_bytes": file_bytes,
        "quota_interp_cpu_seconds": interp_cpu_seconds,
        "quota_result_bytes": result_bytes,
        "interp_full_logits": interp_full_logits or None,
        "quota_interp_served_bytes": interp_served_bytes,
        "interp_review_served_bytes": interp_review_served_bytes,
        "embargo_days": embargo_days,
    }
    terms = {name: value for name, value in shortcuts.items() if value is not None}

    def body() -> None:
        start = not_before.replace(tzinfo=UTC) if not_before and not_before.tzinfo is None else not_before
        not_after = (start or utcnow()) + parse_duration(expires) if expires else None
        with open_database() as (_s, db), db.session() as session:
            grant = create_grant(
                session,
                GrantRequest(
                    evaluator=evaluator,
                    model=model,
                    versions=_split(versions) if versions else None,
                    variants=_split(variants),
                    scopes=_split(scopes),
                    not_before=start,
                    not_after=not_after,
                    terms={**terms, **_parse_terms(term or [])},
                    notes=notes,
                    created_by="cli",
                ),
            )
            print(grant.id)

    run_command(body)


def _parse_terms(pairs: list[str]) -> dict[str, Any]:
    """Parse ``NAME=VALUE`` pairs; a VALUE that is valid JSON (numbers, true, null) is taken as JSON."""
    terms: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name.strip():
            raise typer.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--term")
        try:
            terms[name.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            terms[name.strip()] = raw
    return terms


@grant_app.command("terms")
def grant_terms_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List every grant term each capability declares, with its type and default."""
    import airlock.schema  # noqa: F401  (every built-in section, even without installed entry points)
    from airlock.access.terms import all_terms

    rows = []
    for section, cls in all_terms().items():
        properties = cls.model_json_schema()["properties"]
        for name, field in cls.model_fields.items():
            prop = properties[name]
            kinds = [p.get("type", "?") for p in prop.get("anyOf", [prop])]
            rows.append(
                {
                    "section": section,
                    "name": name,
                    "type": " | ".join(kinds),
                    "default": field.get_default(call_default_factory=True),
                    "public": name in cls.public_terms,
                    "description": field.description or "",
                }
            )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("section", "term", "type", "default", "public", "description")
    for row in rows:
        table.add_row(
            row["section"],
            row["name"],
            row["type"],
            json.dumps(row["default"]),
            "yes" if row["public"] else "",
            row["description"],
        )
    console.print(table)


def _show_proposal(proposed: dict[str, Any]) -> None:
    """Print the proposed terms of the caller's grant and whether they are accepted."""
    doc = proposed["proposal"]
    state = proposed["acceptance"]
    console.print(f"grant {proposed['grant_id']} on {proposed['model']} (versions {', '.join(proposed['versions'])})")
    console.print(f"variants: {', '.join(doc['variants'])}; scopes: {', '.join(doc['scopes'])}")
    console.print(f"valid from {doc['not_before']} until {doc['not_after'] or 'revoked'}")
    table = Table("term", "value")
    for name, value in doc["terms"].items():
        table.add_row(name, json.dumps(value))
    console.print(table)
    console.print(f"terms_sha256: {proposed['terms_sha256']}")
    if state["accepted"]:
        console.print(
            f"[green]accepted[/] at {state['accepted_at']} with key {state['key_fingerprint'][:16]}… "
            f"(seal key {state['seal_public_key']})"
        )
    else:
        console.print("[yellow]not accepted[/]: `airlock grant accept` signs these terms with your key")


@grant_app.command("terms-proposed")
def grant_terms_proposed(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Show the terms the lab proposes for your grant and whether you accepted them (evaluator side)."""
    from airlock.evals.client import LabClient

    def body() -> None:
        proposed = LabClient.from_env().proposed_terms()
        if as_json:
            print(json.dumps(proposed, indent=2))
            return
        _show_proposal(proposed)

    run_command(body)


@grant_app.command("accept")
def grant_accept(
    grant_id: Annotated[str | None, typer.Argument(help="The grant (checked against your key's grant).")] = None,
    key: Annotated[Path | None, typer.Option(help="Signing key (default: the one keygen wrote).")] = None,
    seal_key: Annotated[
        Path | None, typer.Option(help="Sealing key (default: seal.key beside the signing key).")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Accept without asking.")] = False,
) -> None:
    """Show your grant's proposed terms and accept them with a signature by your registered key (evaluator side)."""
    from airlock.evals.client import LabClient, default_key_path, default_seal_key_path, sign_acceptance

    def body() -> None:
        lab = LabClient.from_env()
        key_path = key or default_key_path()
        seal_path = seal_key or default_seal_key_path(key_path)
        for path, what in ((key_path, "signing key"), (seal_path, "sealing key")):
            if not path.exists():
                raise AirlockError(f"no {what} at {path}; run `airlock evaluator keygen --register` first")
        proposed = lab.proposed_terms()
        if grant_id is not None and grant_id != proposed["grant_id"]:
            raise AirlockError(f"your API key belongs to grant {proposed['grant_id']}, not {grant_id}")
        _show_proposal(proposed)
        if not yes and not typer.confirm("Accept these terms, signed with your key?", default=False):
            raise AirlockError("not accepted")
        stored = lab.accept_terms(sign_acceptance(proposed, key_path, seal_path))
        console.print(
            f"[green]accepted[/] grant {stored['grant_id']} terms {stored['terms_sha256'][:16]}… "
            f"({stored['id']}, recorded in the ledger)"
        )

    run_command(body)


@grant_app.command("list")
def grant_list(
    evaluator: Annotated[str | None, typer.Option(help="Only this evaluator's grants.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List grants with their status."""
    from airlock.access.schemas import GrantPublic
    from airlock.access.service import list_grants

    def body() -> None:
        with open_database() as (_s, db), db.session() as session:
            grants = [GrantPublic.of(g) for g in list_grants(session, evaluator=evaluator)]
        if as_json:
            print(json.dumps([g.model_dump(mode="json") for g in grants], indent=2))
            return
        table = Table("id", "evaluator", "variants", "scopes", "status", "valid until", "tokens used", "terms")
        table.columns[0].no_wrap = True
        for g in grants:
            table.add_row(
                g.id,
                g.evaluator,
                ",".join(g.variants),
                ",".join(g.scopes) + (" (interp: full logits)" if g.terms["interp"]["interp_full_logits"] else ""),
                g.status,
                fmt_ts(g.not_after),
                str(g.tokens_used),
                "accepted" if g.acceptance.accepted else "not accepted",
            )
        console.print(table)

    run_command(body)


@grant_app.command("revoke")
def grant_revoke(
    grant_id: Annotated[str, typer.Argument(help="Grant id.")],
    reason: Annotated[str, typer.Option(help="Why (kept with the grant).")] = "",
) -> None:
    """Revoke a grant at once: every key of it stops working."""
    from airlock.access.service import revoke_grant

    def body() -> None:
        with open_database() as (_s, db), db.session() as session:
            grant = revoke_grant(session, grant_id, reason)
            console.print(f"revoked {grant.id} at {fmt_ts(grant.revoked_at)}")

    run_command(body)


# ---------------------------------------------------------------- keys


@key_app.command("create")
def key_create(
    grant: Annotated[str, typer.Option(help="Grant id the key is bound to.")],
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
) -> None:
    """Create an API key for a grant; the key is printed once and stored only as a hash."""
    from airlock.access.service import create_api_key

    def body() -> None:
        with open_database() as (_s, db), db.session() as session:
            _key, token = create_api_key(session, grant, name)
            print(token)

    run_command(body)


@key_app.command("revoke")
def key_revoke(key_id: Annotated[str, typer.Argument(help="Key id (key_...).")]) -> None:
    """Revoke one API key."""
    from airlock.access.service import revoke_api_key

    def body() -> None:
        with open_database() as (_s, db), db.session() as session:
            revoke_api_key(session, key_id)
            console.print(f"revoked {key_id}")

    run_command(body)


# ---------------------------------------------------------------- admin tokens


@admin_app.command("token")
def admin_token(
    name: Annotated[str, typer.Argument(help="Who the token is for.")],
    role: Annotated[
        str,
        typer.Option(
            help="Lab role: admin (models, evaluators, grants, keys, revocation), reviewer (interp and report "
            "review), decider (stage changes; gate overrides as the policy says) or auditor (read-only "
            "audit trail, grants and results; ledger checkpoints). Any other role is refused."
        ),
    ] = "admin",
) -> None:
    """Create a lab token for the admin API (printed once); operator-only: it writes the lab's database."""
    from airlock.access.service import create_admin_token

    def body() -> None:
        with open_database() as (_s, db), db.session() as session:
            _row, token = create_admin_token(session, name, role)
            print(token)

    run_command(body)


# ---------------------------------------------------------------- audit


def _audit_table(events: list[Any]) -> Table:
    table = Table("id", "time", "actor", "model", "scope", "status", "outcome", "in", "out", "ms")
    for e in events:
        table.add_row(
            str(e.id),
            fmt_ts(e.ts),
            e.actor or e.actor_type,
            e.model or e.path,
            e.scope or "-",
            str(e.status_code),
            e.outcome + (f" ({e.error_code})" if e.error_code else ""),
            str(e.tokens_in),
            str(e.tokens_out),
            f"{e.latency_ms:.0f}",
        )
    return table


@audit_app.command("tail")
def audit_tail(
    n: Annotated[int, typer.Option("-n", help="Number of events.")] = 20,
    grant: Annotated[str | None, typer.Option(help="Only this grant's events.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """Show the newest audit events."""
    from airlock.access.audit import tail
    from airlock.access.schemas import AuditEventPublic

    with open_database() as (_s, db):
        last = 0
        while True:
            with db.session() as session:
                events = [e for e in tail(session, n, grant_id=grant) if e.id > last]
            if events:
                last = events[-1].id
                if as_json:
                    for e in events:
                        print(AuditEventPublic.of(e).model_dump_json())
                else:
                    console.print(_audit_table(events))
            if not follow:
                return
            time.sleep(1.0)


@audit_app.command("summary")
def audit_summary() -> None:
    """Show requests and tokens per evaluator, variant and outcome."""
    from airlock.access.audit import summary

    with open_database() as (_s, db), db.session() as session:
        console.print(summary_table(summary(session)))


# ---------------------------------------------------------------- evaluations


def _parse_task_args(values: list[str]) -> dict[str, Any]:
    import yaml

    args: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"task argument {item!r} is not key=value")
        args[key] = yaml.safe_load(raw)
    return args


@eval_app.command("run")
def eval_run(
    tasks: Annotated[list[str], typer.Argument(help="Built-in suite names or Inspect task files.")],
    model: Annotated[list[str], typer.Option("--model", "-m", help="Granted {model}/{variant}; repeatable.")],
    limit: Annotated[int | None, typer.Option(help="Samples per task.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs per sample.")] = None,
    task_arg: Annotated[list[str] | None, typer.Option("--task-arg", "-T", help="Task argument key=value.")] = None,
    log_dir: Annotated[Path | None, typer.Option(help="Where logs go (default: a stable dir per run).")] = None,
    max_connections: Annotated[int, typer.Option(help="Concurrent requests per model.")] = 8,
    max_tokens: Annotated[int | None, typer.Option(help="Generation budget per model call.")] = None,
    display: Annotated[str, typer.Option(help="Inspect display: full, rich, plain, none.")] = "rich",
) -> None:
    """Run suites against granted variants as a resumable Inspect eval set (re-run finishes what is missing)."""
    from inspect_ai import eval_set
    from inspect_ai.model import get_model

    from airlock.evals.client import LabClient, resolve_tasks, run_dir_name

    def body() -> None:
        args = _parse_task_args(task_arg or [])
        LabClient.from_env()  # fail early, before Inspect starts, if the lab is not configured
        options = {"limit": limit, "epochs": epochs, "task_args": args, "max_tokens": max_tokens}
        directory = log_dir or get_settings().home_dir / "evals" / run_dir_name(tasks, model, options)
        console.print(f"logs: {directory}")
        # memoize=False: a fresh client per run, reading the current AIRLOCK_BASE_URL/API_KEY.
        models = [get_model(f"airlock/{m}", memoize=False) for m in model]
        # Each model's provenance also goes into every log header (eval-level metadata, keyed by the
        # log's model name): it survives --no-log-samples and header-only reads. Inspect leaves
        # metadata out of an eval set's task identity, so resuming is unaffected.
        header = {str(m): getattr(m.api, "provenance", None) for m in models}
        success, logs = eval_set(
            resolve_tasks(tasks, args),
            model=models,
            metadata={"airlock": {name: record for name, record in header.items() if record is not None}},
            log_dir=str(directory),
            limit=limit,
            epochs=epochs,
            max_connections=max_connections,
            max_tokens=max_tokens,
            display=display,  # type: ignore[arg-type]
            retry_attempts=2,
        )
        table = Table("task", "model", "status", "samples", "metrics")
        for log in logs:
            metrics = ""
            if log.results and log.results.scores:
                headline = log.results.scores[0]  # the breakdowns are in the log and `airlock eval submit`
                metrics = ", ".join(f"{name}={m.value:.3f}" for name, m in list(headline.metrics.items())[:2])
            samples = str(log.results.completed_samples) if log.results else "0"
            table.add_row(
                log.eval.task.removeprefix("airlock/"),
                log.eval.model.removeprefix("airlock/"),
                log.status,
                samples,
                metrics,
            )
        console.print(table)
        if not success:
            raise AirlockError(f"some tasks did not finish; re-run the same command to resume (logs in {directory})")

    run_command(body)


@eval_app.command("submit")
def eval_submit(
    paths: Annotated[list[Path], typer.Argument(help="Eval logs or directories of logs.")],
    key: Annotated[Path | None, typer.Option(help="Signing key (default: the one keygen wrote).")] = None,
) -> None:
    """Sign each log's result and submit it to the lab, which verifies it against your grant."""
    from airlock.evals.client import LabClient, attest_and_submit, default_key_path, find_logs

    def body() -> None:
        lab = LabClient.from_env()
        key_path = key or default_key_path()
        if not key_path.exists():
            raise AirlockError(f"no signing key at {key_path}; run `airlock evaluator keygen --register` first")
        table = Table("result", "task", "variant", "samples", "mean score (95% CI)")
        failures = 0
        for log in find_logs(paths):
            try:
                envelope, stored = attest_and_submit(log, lab, key_path)
            except (AirlockError, ValueError) as exc:
                failures += 1
                err.print(f"[red]refused[/] {log.name}: {exc}")
                continue
            metric = envelope["attestation"]["metrics"]["mean_score"]
            lo, hi = metric["ci95"]
            table.add_row(
                stored["id"],
                stored["task"],
                stored["variant"],
                str(stored["samples"]),
                f"{metric['value']:.3f} [{lo:.3f}, {hi:.3f}]",
            )
        console.print(table)
        if failures:
            raise AirlockError(f"{failures} result(s) were not accepted")

    run_command(body)


@eval_app.command("results")
def eval_results(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List your organisation's accepted results at the lab."""
    from airlock.evals.client import LabClient

    def body() -> None:
        results = LabClient.from_env().results()
        if as_json:
            print(json.dumps(results, indent=2))
            return
        table = Table("id", "task", "variant", "samples", "mean score (95% CI)", "fine-tuned", "submitted")
        for r in results:
            metric = r["metrics"].get("mean_score", {})
            lo, hi = metric.get("ci95", [float("nan")] * 2)
            table.add_row(
                r["id"],
                r["task"],
                r["variant"],
                str(r["samples"]),
                f"{metric.get('value', float('nan')):.3f} [{lo:.3f}, {hi:.3f}]",
                "yes" if r["fine_tuned"] else "no",
                r["created_at"][:19],
            )
        console.print(table)

    run_command(body)


@eval_app.command("compare")
def eval_compare(
    paths: Annotated[list[Path], typer.Argument(help="Eval logs or directories of logs.")],
    a: Annotated[str, typer.Option(help="Baseline {model}/{variant}, e.g. smollm2-135m/production.")],
    b: Annotated[str, typer.Option(help="Other {model}/{variant}, e.g. smollm2-135m/helpful-only.")],
    png: Annotated[Path | None, typer.Option(help="Where to write the plot.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Compare two variants task by task: paired difference with a 95% CI, as a table and a PNG."""
    from airlock.evals.client import find_logs
    from airlock.evals.reporting import compare_logs, plot_comparison, summarize_log

    def body() -> None:
        latest: dict[tuple[str, str], Any] = {}
        for log in find_logs(paths):
            summary = summarize_log(log)
            if summary.status == "success":
                latest[(summary.task, summary.model_id)] = summary  # sorted names: later logs win
        tasks = sorted({t for t, m in latest if m == a} & {t for t, m in latest if m == b})
        if not tasks:
            raise AirlockError(f"no task has finished logs for both {a} and {b}")
        comparisons = [compare_logs(latest[(t, a)], latest[(t, b)]) for t in tasks]
        if as_json:
            print(json.dumps(comparisons, indent=2))
        else:
            table = Table("task", "paired n", f"a: {a}", f"b: {b}", "b - a (95% CI)")
            for c in comparisons:
                d = c["difference_b_minus_a"]
                table.add_row(
                    c["task"],
                    str(c["paired_samples"]),
                    _ci(c["a"]),
                    _ci(c["b"]),
                    f"{d['value']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]",
                )
            console.print(table)
        out = png or Path(paths[0] if paths[0].is_dir() else paths[0].parent) / (
            f"compare-{a.replace('/', '_')}-vs-{b.replace('/', '_')}.png"
        )
        written = plot_comparison(comparisons, out)
        if not as_json:  # --json output must stay parseable
            console.print(f"plot: {written}")

    run_command(body)


@eval_app.command("elicitation")
def eval_elicitation(
    model_version: Annotated[str, typer.Argument(help="The model version, {model}@{version}.")],
    task: Annotated[str, typer.Option("--task", "-t", help="The task whose attested results are compared.")],
    lab_side: Annotated[
        bool, typer.Option("--lab", help="Read every evaluator's results from the lab's database instead.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Attested results of a task by elicitation level, and the sandbagging checks (exit 1 on a flag)."""
    from airlock.evals.client import LabClient
    from airlock.evals.service import elicitation_report

    def body() -> None:
        if lab_side:
            from airlock.governance.service import active_policy, sandbagging_settings

            with open_database() as (lab_settings, db), db.session() as session:
                checks = sandbagging_settings(active_policy(lab_settings.policy_path))
                report = elicitation_report(
                    session, model_version, task, alpha=checks.alpha, few_shot_min_gain=checks.few_shot_min_gain
                )
        else:
            report = LabClient.from_env().elicitation(model_version, task)
        if as_json:
            print(json.dumps(report, indent=2))
        else:
            table = Table("level", "result", "variant", "settings", "mean score (95% CI)")
            for level, rows in report["levels"].items():
                for r in rows:
                    settings = [f"{r['few_shot']}-shot"]
                    if r.get("noise"):
                        settings.append(f"sigma={r['noise']['sigma']:g} seed={r['noise']['seed']}")
                    if r.get("finetune_job"):
                        settings.append(r["finetune_job"])
                    table.add_row(level, r["result_id"], r["variant"], ", ".join(settings), _ci(r))
            console.print(table)
            console.print(
                f"{report['family_size']} comparison(s), each at {100 * report['interval_level']:.4g} % "
                f"({report['interval_method']}); family-wise alpha {report['alpha']:g}"
            )
            for flag in report["flags"]:
                console.print(f"[red]flag[/] {flag['check']}: {flag['reason']}")
            if not report["flags"]:
                console.print("[green]no flags[/]: no sign of sandbagging in these results")
        if report["flagged"]:
            raise typer.Exit(1)

    run_command(body)


@eval_app.command("noise")
def eval_noise(
    model: Annotated[str, typer.Argument(help="A granted local variant, {model}@{version}/{variant}.")],
    sigma: Annotated[list[float], typer.Option("--sigma", help="Noise standard deviation; repeatable.")],
    seed: Annotated[list[int], typer.Option("--seed", help="Noise seed; repeatable.")],
    ttl_minutes: Annotated[int, typer.Option(help="Minutes the noised variants stay sampleable.")] = 120,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Ask the lab for noise-injected copies of a variant (one per sigma and seed), only your grant may sample."""
    from airlock.evals.client import LabClient

    def body() -> None:
        payload = {"model": model, "sigmas": sigma, "seeds": seed, "ttl_minutes": ttl_minutes}
        job = LabClient.from_env().send("POST", "/airlock/noise/jobs", json=payload).json()
        if as_json:
            print(json.dumps(job, indent=2))
            return
        console.print(f"job {job['id']} ({job['status']}), variants expire at {job['expires_at']}:")
        for v in job["variants"]:
            console.print(f"  {v['id']}")

    run_command(body)


def _ci(stats: dict[str, Any]) -> str:
    return f"{stats['value']:.3f} [{stats['ci95'][0]:.3f}, {stats['ci95'][1]:.3f}]"


# ---------------------------------------------------------------- fine-tuning


def _follow(client: Any, job_id: str, timeout: float) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task(f"{job_id} queued", total=None, loss="")
        while True:
            job = client.fine_tuning.jobs.retrieve(job_id)
            events = client.fine_tuning.jobs.list_events(job_id, limit=50).data
            for event in reversed(events):
                if event.id in seen:
                    continue
                seen.add(event.id)
                data = event.data or {}
                if event.type == "metrics" and "total_steps" in data:
                    progress.update(
                        bar,
                        total=data["total_steps"],
                        completed=data.get("step", 0),
                        loss=f"loss {data.get('train_loss', float('nan')):.3f}",
                    )
                else:
                    progress.console.print(f"  {event.message}")
            progress.update(bar, description=f"{job_id} {job.status}")
            if job.status in ("succeeded", "failed", "cancelled"):
                return job
            if time.monotonic() > deadline:
                raise AirlockError(f"{job_id} still {job.status} after {timeout:.0f}s; follow it again later")
            time.sleep(1.0)


@finetune_app.command("create")
def finetune_create(
    training_file: Annotated[Path, typer.Argument(help="Chat JSONL ({'messages': [...]} per line).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Granted {model}/{variant} to fine-tune.")],
    validation_file: Annotated[Path | None, typer.Option(help="Validation JSONL.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default auto).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (default auto).")] = None,
    lr_multiplier: Annotated[float | None, typer.Option(help="Learning-rate multiplier (default auto).")] = None,
    suffix: Annotated[str | None, typer.Option(help="Suffix of the fine-tuned model id.")] = None,
    seed: Annotated[int | None, typer.Option(help="Training seed.")] = None,
    follow: Annotated[bool, typer.Option(help="Follow progress until the job ends.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to follow before giving up.")] = 3600,
) -> None:
    """Upload a local JSONL file and start a lab-side LoRA fine-tuning job on it."""

    def body() -> None:
        client = openai_client()
        with training_file.open("rb") as fh:
            train_id = client.files.create(file=fh, purpose="fine-tune").id
        valid_id = None
        if validation_file is not None:
            with validation_file.open("rb") as fh:
                valid_id = client.files.create(file=fh, purpose="fine-tune").id
        hyper = {
            k: v
            for k, v in {
                "n_epochs": epochs,
                "batch_size": batch_size,
                "learning_rate_multiplier": lr_multiplier,
            }.items()
            if v is not None
        }
        job = client.fine_tuning.jobs.create(
            model=model,
            training_file=train_id,
            validation_file=valid_id,
            hyperparameters=hyper or None,
            suffix=suffix,
            seed=seed,
        )
        console.print(f"job {job.id} ({job.status}); training file {train_id}")
        if follow:
            job = _follow(client, job.id, timeout)
            if job.status != "succeeded":
                raise AirlockError(f"{job.id} {job.status}: {job.error.message if job.error else ''}")
            console.print(f"fine-tuned model: [bold]{job.fine_tuned_model}[/] ({job.trained_tokens} tokens trained)")

    run_command(body)


@finetune_app.command("follow")
def finetune_follow(
    job_id: Annotated[str, typer.Argument(help="Fine-tuning job id.")],
    timeout: Annotated[float, typer.Option(help="Seconds to follow before giving up.")] = 3600,
) -> None:
    """Follow a job's progress until it ends."""

    def body() -> None:
        job = _follow(openai_client(), job_id, timeout)
        console.print(f"{job.id} {job.status}" + (f": {job.fine_tuned_model}" if job.fine_tuned_model else ""))

    run_command(body)


@finetune_app.command("list")
def finetune_list() -> None:
    """List your grant's fine-tuning jobs."""

    def body() -> None:
        table = Table("id", "model", "status", "fine-tuned model", "trained tokens")
        table.columns[0].no_wrap = True
        for job in openai_client().fine_tuning.jobs.list(limit=100).data:
            table.add_row(job.id, job.model, job.status, job.fine_tuned_model or "-", str(job.trained_tokens or "-"))
        console.print(table)

    run_command(body)


# ---------------------------------------------------------------- demo


@app.command()
def demo(
    home: Annotated[Path, typer.Option(help="Data dir for the demo (its database is recreated).")] = Path(".demo"),
) -> None:
    """Run the end-to-end demo on the embedded model."""
    os.environ["AIRLOCK_HOME"] = str(home.resolve())
    reset_settings()
    from airlock.demo import run_demo

    raise typer.Exit(run_demo(home.resolve()))


def main() -> None:
    """Entry point for ``python -m airlock``."""
    app()


if __name__ == "__main__":
    main()
