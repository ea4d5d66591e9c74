"""`airlock contamination ...`: evaluators fingerprint and register test sets; the lab checks a training corpus.

Evaluator commands: ``fingerprint`` runs offline on the evaluator's machine (the test set never
leaves it); ``register``, ``status`` and ``withdraw`` talk to the lab over HTTP
(``AIRLOCK_BASE_URL``, ``AIRLOCK_API_KEY``). The lab's ``check`` reads the corpus locally and
gets the fingerprints either from the database (the operator, or a lab token given with
``--token``) or over HTTP with a lab token (``--url``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from airlock.cli_support import console, fail, fmt_ts, open_database, run_command

app = typer.Typer(
    help="Contamination firewall: fingerprint private test sets; check training corpora against them.",
    no_args_is_help=True,
)


def _call(method: str, path: str, **kwargs: Any) -> Any:
    """Call the lab's evaluator API (AIRLOCK_BASE_URL / AIRLOCK_API_KEY); errors become AirlockErrors."""
    from airlock.evals.client import LabClient

    return LabClient.from_env().send(method, path, **kwargs).json()


@app.command("fingerprint")
def fingerprint(
    testset: Annotated[
        Path,
        typer.Argument(help="Test set: JSONL (one item per line), a directory (one file per item) or a text file."),
    ],
    field: Annotated[str, typer.Option(help="JSONL field holding the item's text (a list is joined).")] = "text",
    id_field: Annotated[
        str | None, typer.Option(help="JSONL field to use as item id (default: the line number, revealing nothing).")
    ] = None,
    name: Annotated[str, typer.Option(help="A label for the test set (committed in the lab's ledger).")] = "",
    ngram: Annotated[int, typer.Option(help="Words per shingle.")] = 3,
    threshold: Annotated[
        float, typer.Option(help="Fraction of an item's shingles a document must hold to match.")
    ] = 0.4,
    min_shingles: Annotated[int, typer.Option(help="...and at least this many (or all the item has).")] = 3,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of standard output.")
    ] = None,
) -> None:
    """Fingerprint a test set offline (salted hashes of word shingles); the output is what you register."""
    from airlock.contamination.corpus import Reader
    from airlock.contamination.scheme import Scheme, fingerprint_items

    def body() -> None:
        try:
            scheme = Scheme(ngram, threshold, min_shingles)
            reader = Reader(testset, field=field, id_field=id_field)
            fp = fingerprint_items(reader, name=name or testset.name, scheme=scheme)
        except ValueError as exc:
            raise fail(str(exc)) from None
        if not fp.items:
            raise fail(f"no item of {testset} is long enough to fingerprint ({ngram} words with a non-stop word)")
        text = json.dumps(fp.to_json())
        if output is None:
            sys.stdout.write(text + "\n")
        else:
            output.write_text(text + "\n", encoding="utf-8")
        shingles = sum(item.shingles.size for item in fp.items)
        note = f"; {fp.skipped} item(s) too short, left out" if fp.skipped else ""
        print(f"{len(fp.items)} item(s), {shingles} shingle hash(es){note}", file=sys.stderr)

    run_command(body)


@app.command("register")
def register(
    file: Annotated[Path, typer.Argument(help="The fingerprint file written by `fingerprint`.")],
) -> None:
    """Register a fingerprint with the lab under your organisation (evaluator side)."""

    def body() -> None:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise fail(f"cannot read {file}: {exc}") from None
        reg = _call("POST", "/airlock/contamination/registrations", json=data)
        console.print(f"registration {reg['id']}: {reg['items']} item(s), digest {reg['digest']}")

    run_command(body)


@app.command("status")
def status() -> None:
    """List your organisation's registrations and the items the lab's checks found (evaluator side)."""

    def body() -> None:
        regs = _call("GET", "/airlock/contamination/registrations")
        table = Table("registration", "name", "status", "items", "checks", "items found", "registered")
        for r in regs:
            table.add_row(
                r["id"],
                escape(r["name"]),
                r["status"],
                str(r["items"]),
                str(r["checks"]),
                str(len(r["found"])),
                r["created_at"],
            )
        console.print(table)
        for r in regs:
            for hit in r["found"]:
                console.print(
                    f"{r['id']}: item {escape(hit['item'])} in {hit['documents']} document(s), "
                    f"up to {hit['max_fraction']:.0%} of its shingles"
                )

    run_command(body)


@app.command("withdraw")
def withdraw(registration_id: Annotated[str, typer.Argument(help="The registration.")]) -> None:
    """Take a registration out of future checks (evaluator side)."""

    def body() -> None:
        reg = _call("POST", f"/airlock/contamination/registrations/{registration_id}/withdraw")
        console.print(f"registration {reg['id']} is now {reg['status']}")

    run_command(body)


def _admin_call(url: str, token: str, method: str, path: str, **kwargs: Any) -> Any:
    from airlock.evals.client import LabClient

    return LabClient(url.rstrip("/"), token).send(method, path, timeout=300, **kwargs).json()


@app.command("check")
def check(
    corpus: Annotated[
        Path,
        typer.Argument(
            help="Corpus: a directory (one file per document), JSONL (one document per line) or a text file."
        ),
    ],
    field: Annotated[str, typer.Option(help="JSONL field holding the document's text.")] = "text",
    id_field: Annotated[str, typer.Option(help="JSONL field naming the document (default: the line number).")] = "id",
    out: Annotated[
        Path | None, typer.Option(help="Write every match as JSONL (document, registration, item, fraction).")
    ] = None,
    label: Annotated[str, typer.Option(help="A label for the corpus (committed in the ledger).")] = "",
    batch: Annotated[int, typer.Option(help="Documents per batch.")] = 2048,
    workers: Annotated[int, typer.Option(help="Processes checking batches in parallel (one per core).")] = 1,
    show: Annotated[int, typer.Option(help="Print this many matches.")] = 20,
    token: Annotated[
        str | None, typer.Option(envvar="AIRLOCK_ADMIN_TOKEN", help="Lab token to act for (needs contamination:check).")
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(
            envvar="AIRLOCK_ADMIN_URL",
            help="The gateway (http://host:port) to reach with --token, instead of the database.",
        ),
    ] = None,
) -> None:
    """Check a training corpus against every registered test set (lab side); each check is a ledger event."""
    from airlock.contamination.corpus import Reader, batched
    from airlock.contamination.matcher import Match, check_batches
    from airlock.contamination.scheme import Fingerprint
    from airlock.contamination.service import Actor, CheckResult, complete_check, open_check, summarize

    def run(fingerprints: list[tuple[str, Fingerprint]]) -> tuple[CheckResult, list[Match], float, int]:
        reader = Reader(corpus, field=field, id_field=id_field)
        matches: list[Match] = []
        words = 0
        start = time.perf_counter()
        try:
            for found, counted in check_batches(fingerprints, batched(reader, max(1, batch)), max(1, workers)):
                matches.extend(found)
                words += counted
        except ValueError as exc:
            raise fail(str(exc)) from None
        elapsed = time.perf_counter() - start
        return summarize(matches, reader.count, reader.digest), matches, elapsed, words

    def body() -> None:
        if url and not token:
            raise fail("--url needs a lab token (--token or AIRLOCK_ADMIN_TOKEN) with contamination:check")
        if url and token:
            opened = _admin_call(url, token, "POST", "/v1/airlock/admin/contamination/checks", json={"corpus": label})
            check_id = opened["check"]["id"]
            fingerprints = [(fp["registration"], Fingerprint.from_json(fp)) for fp in opened["fingerprints"]]
            result, matches, elapsed, words = run(fingerprints)
            report = {
                "documents": result.documents,
                "matched_documents": result.matched_documents,
                "corpus_digest": result.corpus_digest,
                "hits": [vars(h) for h in result.hits],
            }
            _admin_call(url, token, "POST", f"/v1/airlock/admin/contamination/checks/{check_id}/result", json=report)
        else:
            from airlock.access.roles import Permission
            from airlock.access.service import authenticate_admin

            with open_database() as (_settings, db):
                with db.session() as session:
                    if token:
                        principal = authenticate_admin(session, token)
                        principal.require(Permission.CONTAMINATION_CHECK)
                        actor = Actor(principal.name, principal.role, principal.token_id)
                    else:
                        actor = Actor("cli:operator", "operator")
                    row, fingerprints = open_check(session, actor, label or corpus.name)
                    check_id = row.id
                result, matches, elapsed, words = run(fingerprints)
                with db.session() as session:
                    complete_check(session, check_id, actor, result)
        if out is not None:
            with out.open("w", encoding="utf-8") as fh:
                for m in matches:
                    fh.write(json.dumps(vars(m)) + "\n")
        rate = result.documents / elapsed if elapsed > 0 else float("inf")
        mean_words = words / result.documents if result.documents else 0.0
        console.print(
            f"check {check_id}: {len(fingerprints)} registration(s), {result.documents} document(s) "
            f"(mean {mean_words:.0f} words) in {elapsed:.2f} s ({rate:,.0f} documents/s); "
            f"{result.matched_documents} document(s) overlap a registered item"
        )
        table = Table("document", "registration", "item", "fraction", "shingles")
        for m in matches[: max(0, show)]:
            table.add_row(
                escape(m.document), m.registration, escape(m.item), f"{m.fraction:.0%}", f"{m.shingles}/{m.of}"
            )
        if matches:
            console.print(table)

    run_command(body)


@app.command("checks")
def checks() -> None:
    """List the lab's contamination checks (lab side, operator's CLI)."""
    from airlock.contamination.service import list_checks

    def body() -> None:
        with open_database() as (_s, db), db.session() as session:
            table = Table("check", "actor", "role", "status", "registrations", "documents", "matched", "opened")
            for c in list_checks(session):
                table.add_row(
                    c.id,
                    escape(c.actor),
                    c.role,
                    c.status,
                    str(len(c.registrations)),
                    str(c.documents if c.documents is not None else "-"),
                    str(c.matched_documents if c.matched_documents is not None else "-"),
                    fmt_ts(c.created_at),
                )
            console.print(table)

    run_command(body)
