"""`airlock sealed ...`: content the lab holds sealed to an evaluator's key; fetch, decrypt, release.

Evaluator side (over HTTP, ``AIRLOCK_BASE_URL`` / ``AIRLOCK_API_KEY``): ``list`` the items sealed
under the key's grant, ``fetch`` one and open it locally with the seal key ``airlock evaluator
keygen`` wrote, ``release`` one to the lab (the plaintext goes back; the lab checks its SHA-256 and
records the release in its ledger). Lab side: ``list --grant GRANT`` reads the database as the
operator (metadata only; the lab holds no key to open an item).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from airlock.cli_support import console, fail, open_database, run_command

app = typer.Typer(
    help="Sealed retention: list, fetch and decrypt (evaluator) or list (lab) content sealed to the evaluator.",
    no_args_is_help=True,
)

SealKeyOpt = Annotated[
    Path | None,
    typer.Option("--seal-key", help="Your X25519 seal key (default: seal.key beside your signing key)."),
]


def _client() -> Any:
    from airlock.evals.client import LabClient

    return LabClient.from_env()


def _seal_key(path: Path | None) -> Any:
    """Load the evaluator's X25519 seal key (``airlock evaluator keygen`` writes it beside the signing key)."""
    from airlock.evals.client import default_seal_key_path, load_seal_key

    path = path or default_seal_key_path()
    try:
        return load_seal_key(path)
    except FileNotFoundError:
        raise fail(f"no seal key at {path}; run `airlock evaluator keygen` or pass --seal-key") from None
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise fail(f"{path} is not a seal key (base64 of 32 bytes)") from None


def _open(item_id: str, seal_key: Path | None) -> tuple[dict[str, Any], bytes]:
    """Fetch an item's metadata and ciphertext, open it with the seal key, and check the plaintext's digest."""
    from nacl.exceptions import CryptoError
    from nacl.public import SealedBox

    client = _client()
    meta: dict[str, Any] = client.send("GET", f"/airlock/sealed/{item_id}").json()
    key = _seal_key(seal_key)
    if hashlib.sha256(bytes(key.public_key)).hexdigest() != meta["recipient_sha256"]:
        raise fail(f"item {item_id} is sealed to another key than {seal_key or 'your default seal key'}")
    box = client.send("GET", f"/airlock/sealed/{item_id}/ciphertext").content
    try:
        plaintext = SealedBox(key).decrypt(box)
    except CryptoError:
        raise fail(f"item {item_id} does not open with this seal key (or its ciphertext was altered)") from None
    if hashlib.sha256(plaintext).hexdigest() != meta["plaintext_sha256"]:
        raise fail(f"item {item_id} opened, but its content does not match the digest the lab recorded")
    return meta, bytes(plaintext)


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table(show_header=True, header_style="bold")
    table.add_column("id", no_wrap=True, min_width=20)
    for column in ("kind", "ref", "name", "bytes", "sha256", "released"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            row["id"],
            row["kind"],
            row["ref"],
            escape(row["name"]),
            str(row["size"]),
            row["plaintext_sha256"][:12],
            f"{str(row['released_at'])[:19]} by {escape(row['released_by'] or '')}" if row["released_at"] else "-",
        )
    return table


@app.command("list")
def list_items(
    grant: Annotated[
        str | None, typer.Option(help="Lab side: list this grant's sealed items from the database (operator).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List sealed items: yours over HTTP, or (with --grant) a grant's from the lab's database."""

    def body() -> None:
        if grant is None:
            rows: list[dict[str, Any]] = _client().send("GET", "/airlock/sealed").json()
        else:
            from airlock.access import sealing
            from airlock.access.schemas import SealedItemPublic

            with open_database() as (_settings, db), db.session() as session:
                items = sealing.list_items(session, grant_id=grant)
                rows = [SealedItemPublic.of(item).model_dump(mode="json") for item in items]
        if as_json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            console.print("no sealed items")
        else:
            console.print(_table(rows))

    run_command(body)


@app.command("fetch")
def fetch(
    item_id: Annotated[str, typer.Argument(help="Sealed item id (sld_...).")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the decrypted content here (default: stdout).")
    ] = None,
    seal_key: SealKeyOpt = None,
) -> None:
    """Download a sealed item and decrypt it locally with your seal key (the lab never sees it)."""

    def body() -> None:
        meta, plaintext = _open(item_id, seal_key)
        if output is None:
            sys.stdout.buffer.write(plaintext)
            sys.stdout.buffer.flush()
        else:
            output.write_bytes(plaintext)
            console.print(f"wrote {output} ({meta['kind']} of {meta['ref']}, {len(plaintext)} bytes, SHA-256 verified)")

    run_command(body)


@app.command("release")
def release(
    item_id: Annotated[str, typer.Argument(help="Sealed item id (sld_...).")],
    file: Annotated[
        Path | None, typer.Option(help="Send this file as the content (default: fetch and decrypt the item).")
    ] = None,
    seal_key: SealKeyOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Release an item to the lab: its plaintext goes back, readable by the lab from then on (a ledger event)."""

    def body() -> None:
        plaintext = file.read_bytes() if file is not None else _open(item_id, seal_key)[1]
        if not yes and not typer.confirm(f"release {item_id} ({len(plaintext)} bytes) to the lab, readable?"):
            raise fail("not released")
        payload = {"content_base64": base64.b64encode(plaintext).decode("ascii")}
        row = _client().send("POST", f"/airlock/sealed/{item_id}/release", json=payload).json()
        console.print(f"released {row['id']} ({row['kind']} of {row['ref']}) at {row['released_at']}")

    run_command(body)
