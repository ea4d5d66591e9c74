"""`airlock ledger ...`: status, checkpoints, public key, export, offline verify, lab-side check, reveal, reseal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from airlock.access.audit import AUDIT_DIGEST
from airlock.cli_support import console, err, fail, fmt_ts, open_database, run_command

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from airlock.config import Settings
    from airlock.db import Database
    from airlock.ledger.witness import Witness

app = typer.Typer(
    help="Public transparency ledger: Merkle log, signed checkpoints, proofs, offline verifier.", no_args_is_help=True
)
witness_app = typer.Typer(
    help="Run a C2SP tlog witness: cosign a log's checkpoints along one append-only history.", no_args_is_help=True
)


@app.command("status")
def status() -> None:
    """Show the tree size, pending events and the newest checkpoint."""

    def body() -> None:
        from airlock.ledger import service

        with open_database() as (_settings, db), db.session() as session:
            head = service.tree_head(session)
            cp = service.latest_checkpoint(session)
            console.print(f"entries: {head.size}   pending: {service.pending_count(session)}")
            if cp is None:
                console.print("no checkpoint yet (run `airlock ledger checkpoint`)")
            else:
                console.print(f"newest checkpoint: size {cp.size}, signed {fmt_ts(cp.created_at)}")

    run_command(body)


@app.command("checkpoint")
def checkpoint(
    force: Annotated[bool, typer.Option(help="Sign a new checkpoint even if the tree has not grown.")] = False,
) -> None:
    """Integrate pending events, digest the audit table, and sign a checkpoint; print it."""

    def body() -> None:
        from airlock.ledger import service

        with open_database() as (settings, db):
            service.digest_audit(db, AUDIT_DIGEST)
            row = service.publish_checkpoint(db, service.get_signer(settings), force=force)
            note = _cosign(settings, db) or row.note
            # Plain echo, never rich: a wrapped signature line would no longer verify.
            typer.echo(note, nl=False)

    run_command(body)


@app.command("pubkey")
def pubkey(
    out: Annotated[Path | None, typer.Option(help="Also write the key to this file.")] = None,
) -> None:
    """Print the lab's checkpoint verifier key (C2SP note format), creating the signing key on first use."""

    def body() -> None:
        from airlock.config import get_settings
        from airlock.ledger.service import get_signer

        vkey = get_signer(get_settings()).verifier.vkey()
        if out is not None:
            out.write_text(vkey + "\n")
        typer.echo(vkey)

    run_command(body)


@app.command("export")
def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle file to write.")] = Path("ledger-bundle.json"),
) -> None:
    """Write a self-contained bundle (entries, checkpoints, consistency proofs, public key) after a fresh checkpoint."""

    def body() -> None:
        from airlock.ledger import service

        with open_database() as (settings, db):
            service.digest_audit(db, AUDIT_DIGEST)
            service.publish_checkpoint(db, service.get_signer(settings))
            _cosign(settings, db)
            bundle = service.export_bundle(db, service.get_signer(settings))
        out.write_text(json.dumps(bundle, indent=1, ensure_ascii=False) + "\n")
        console.print(f"wrote {out}: {len(bundle['entries'])} entries, {len(bundle['checkpoints'])} checkpoints")

    run_command(body)


@app.command("verify")
def verify(
    bundle: Annotated[Path, typer.Argument(help="Bundle written by `airlock ledger export`.")],
    key: Annotated[
        str | None, typer.Option(help="The lab's verifier key (string or file) to pin; required to pass.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Answer the access questions for this model.")] = None,
    version: Annotated[str | None, typer.Option(help="Restrict to one version (label or hash prefix).")] = None,
    unsafe_trust_bundle_key: Annotated[
        bool, typer.Option(help="Trust the key inside the bundle instead of a pinned one (prints a warning).")
    ] = False,
    witness: Annotated[
        list[str] | None, typer.Option(help="A witness's verifier key (string or file); repeat for each.")
    ] = None,
    quorum: Annotated[int | None, typer.Option(help="How many witnesses must have cosigned (default: all).")] = None,
) -> None:
    """Verify a bundle offline (same as `airlock-verify`): signatures, consistency, inclusion, reveals, cosignatures."""
    from airlock.ledger.verify import run

    code, text = run(
        bundle,
        key=key,
        model=model,
        version=version,
        trust_bundle_key=unsafe_trust_bundle_key,
        witnesses=witness or [],
        quorum=quorum,
    )
    typer.echo(text)
    if code:
        raise typer.Exit(code)


def _check_acceptances(session: Session) -> list[str]:
    """Verify every signed acceptance against the signing key registered under its fingerprint."""
    from airlock.access.acceptance import SignerKey, check_acceptances
    from airlock.evals.service import find_signing_key

    def signer_of(fingerprint: str) -> SignerKey | None:
        key = find_signing_key(session, fingerprint) if fingerprint else None
        if key is None:
            return None
        return SignerKey(key.evaluator_id, key.public_key, key.fingerprint, key.revoked_at is not None)

    return check_acceptances(session, signer_of)


@app.command("check")
def check(
    audit: Annotated[bool, typer.Option(help="Also recompute every audit-table digest.")] = True,
    grants: Annotated[
        bool, typer.Option(help="Also check every grant's seal and compare its terms with its ledger entries.")
    ] = True,
) -> None:
    """Lab-side tamper check: recompute the log, nodes, checkpoints and audit digests; reconcile grants."""

    def body() -> None:
        from airlock.access.seal import check_grants
        from airlock.ledger import service

        with open_database() as (settings, db):
            problems = service.check_database(db, service.get_signer(settings), audit=AUDIT_DIGEST if audit else None)
            if grants:
                with db.session() as session:
                    problems += check_grants(session, settings)
                    problems += _check_acceptances(session)
        if problems:
            for p in problems:
                # Escaped: logged values hold brackets that rich would read as markup.
                console.print(f"[red]✗[/] {escape(p)}")
            raise fail(f"{len(problems)} problem(s): the ledger, the audit table or a grant was altered")
        checked = ["entries", "tree nodes", "checkpoints"] + (["audit digests"] if audit else [])
        checked += ["grant seals, terms and signed acceptances"] if grants else []
        console.print("[green]ok[/]: " + ", ".join(checked[:-1]) + " and " + checked[-1])

    run_command(body)


@app.command("reseal-grants")
def reseal_grants(
    previous_key: Annotated[
        Path, typer.Option(help="File holding the previous grant seal key (hex), e.g. the moved-aside grant-seal.key.")
    ],
) -> None:
    """Rotate the grant seal key: re-seal every grant that holds its seal under the previous key.

    The configured key (AIRLOCK_GRANT_SEAL_KEY, or <home>/grant-seal.key, created if absent) is the
    new one. A grant that fails its seal under the previous key is left as it was, so it stays refused.
    """

    def body() -> None:
        from airlock.access.seal import parse_key
        from airlock.access.seal import reseal_grants as reseal

        if not previous_key.is_file():
            raise fail(f"{previous_key} is not a file")
        previous = parse_key(previous_key.read_text(), str(previous_key))
        with open_database() as (settings, db):
            report = reseal(db, settings, previous)
        console.print(
            f"re-sealed {report.resealed} grant(s) under key id {report.key_id} ({report.key_source}); "
            f"{report.already} already were"
        )
        if report.refused:
            for grant_id, why in report.refused:
                console.print(f"[red]✗[/] grant {grant_id}: {why} under the previous key; left refused")
            raise fail(f"{len(report.refused)} grant(s) failed their seal and were not re-sealed")

    run_command(body)


@app.command("reveal")
def reveal(
    event_id: Annotated[str, typer.Argument(help="Ledger event id (lev_…).")],
    field: Annotated[list[str] | None, typer.Option(help="Field(s) to reveal (default: all).")] = None,
    publish: Annotated[bool, typer.Option(help="Log the opening publicly as a commitment.revealed entry.")] = True,
) -> None:
    """Print (and by default publish) the salt and value behind an event's commitments."""

    def body() -> None:
        from airlock.ledger import service

        with open_database() as (_settings, db), db.session() as session:
            openings = service.reveal(session, event_id, field or None, publish=publish)
        for o in openings:
            typer.echo(json.dumps({"event": o.event_id, "field": o.field, "salt": o.salt, "value": o.value}))

    run_command(body)


def _cosign(settings: Settings, db: Database) -> str | None:
    """Ask the configured witnesses to cosign the newest checkpoint; return its note (None without witnesses)."""
    import httpx

    from airlock.ledger import service
    from airlock.ledger.cosign import cosign_newest, endpoints_of

    endpoints = endpoints_of(settings)
    if not endpoints:
        return None
    with httpx.Client(timeout=settings.ledger_witness_timeout_s) as client:
        outcome = cosign_newest(db, endpoints, client=client)
    for name, why in outcome.failed.items():
        err.print(f"[yellow]witness {escape(name)} did not cosign[/]: {escape(why)} (retried by the gateway)")
    with db.session() as session:
        row = service.latest_checkpoint(session)
        return row.note if row is not None else None


# ---------------------------------------------------------------- witness


def _witness(store: Path, name: str, logs: list[str]) -> Witness:

    from airlock.ledger._cosig import Cosigner
    from airlock.ledger._note import Verifier, load_or_create_key
    from airlock.ledger.witness import Witness

    verifiers = []
    for vkey in logs:
        text = Path(vkey).read_text().strip() if Path(vkey).is_file() else vkey
        verifiers.append(Verifier.parse(text))
    return Witness(Cosigner(name, load_or_create_key(store / "witness-key.pem")), verifiers, store / "witness.db")


StoreOption = Annotated[Path, typer.Option(help="The witness's directory: its key and its store.")]
NameOption = Annotated[
    str, typer.Option(help="The witness's key name, a schema-less URL such as `witness.example.org/w1`.")
]


@witness_app.command("serve")
def witness_serve(
    log: Annotated[
        list[str], typer.Option(help="Verifier key (string or file) of a log to witness; repeat for several.")
    ],
    store: StoreOption,
    name: NameOption,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 7380,
) -> None:
    """Serve add-checkpoint (c2sp.org/tlog-witness) with this witness's own key and store."""

    def body() -> None:
        import uvicorn

        from airlock.ledger.witness import create_app

        witness = _witness(store, name, log)
        err.print(f"witness {witness.verifier.vkey()} on http://{host}:{port} for {', '.join(witness.logs)}")
        uvicorn.run(create_app(witness), host=host, port=port, log_level="warning")

    run_command(body)


@witness_app.command("pubkey")
def witness_pubkey(store: StoreOption, name: NameOption) -> None:
    """Print the witness's verifier key (creating its signing key on first use)."""

    def body() -> None:
        from airlock.ledger._cosig import Cosigner
        from airlock.ledger._note import load_or_create_key

        typer.echo(Cosigner(name, load_or_create_key(store / "witness-key.pem")).verifier.vkey())

    run_command(body)


@witness_app.command("evidence")
def witness_evidence(
    store: StoreOption,
    name: NameOption,
    out: Annotated[Path | None, typer.Option(help="Write the records to this JSON file.")] = None,
) -> None:
    """List the refused, log-signed checkpoints kept as evidence (check them with `airlock-verify --evidence`)."""

    def body() -> None:
        records = _witness(store, name, []).evidence()
        text = json.dumps(records, indent=1, ensure_ascii=False) + "\n"
        if out is not None:
            out.write_text(text)
            console.print(f"wrote {out}: {len(records)} refusal(s)")
        else:
            typer.echo(text, nl=False)

    run_command(body)
