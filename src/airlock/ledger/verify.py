"""Offline verifier of a ledger bundle: ``airlock-verify BUNDLE --key KEY [--model X [--version V]]``.

Needs only the bundle and the lab's verifier key obtained through a separate channel; no database
and no server. Trust fails closed: a bundle carries its own key, so anyone who rewrites a bundle can
re-sign it, and without a pinned key the check does not pass (``--unsafe-trust-bundle-key`` lifts
that one rule, loudly). It checks, in order:

1. the bundle's key, against the pinned key;
2. every checkpoint's Ed25519 signature and origin;
3. that checkpoint sizes never shrink and that each later checkpoint is consistent with the
   earlier ones (RFC 9162 consistency proofs shipped in the bundle);
4. that every entry is canonical JSON and that the Merkle tree rebuilt from the entries has the
   signed root at every checkpoint size, and an RFC 9162 inclusion proof of every entry against
   the newest checkpoint;
5. that every published reveal opens the commitment it names;
6. with witness keys (``--witness KEY … --quorum K``), that a checkpoint carries valid
   tlog-cosignature/v1 cosignatures by at least K of them: the newest such checkpoint is the one
   the public answers are read against, and entries after it are reported as not yet witnessed;
7. that every ``grant.accepted`` entry (an evaluator's acceptance of a grant's terms) carries an
   Ed25519 signature by the public key it names over the acceptance document it records, that
   the key's fingerprint is its SHA-256, and that the grant it accepts was issued in the ledger.

It then answers the public questions for a model: which evaluators had which access to which
versions, how many days before deployment, and which results were attested.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import itertools
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from airlock.canonical import CanonicalJSONError, canonical_bytes
from airlock.ledger._cosig import WitnessVerifier, cosignatures
from airlock.ledger._entry import parse_entry, parse_time, verify_opening
from airlock.ledger._merkle import MemoryTree, ProofError, leaf_hash, verify_consistency, verify_inclusion
from airlock.ledger._note import NoteError, Verifier, verify_checkpoint

BUNDLE_FORMAT = "airlock.ledger-bundle/v1"


@dataclass
class Report:
    """Outcome of verifying a bundle."""

    origin: str = ""
    size: int = 0
    checkpoints: int = 0
    key_pinned: bool = False
    problems: list[str] = field(default_factory=list)
    entries: list[dict[str, Any]] = field(default_factory=list)
    witnessed_size: int | None = None
    """Size of the newest checkpoint with a quorum of cosignatures (None when no quorum was asked)."""
    witnessed_by: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return not self.problems


UNPINNED = "no pinned key: pass the lab's verifier key (--key), obtained from the lab through another channel"


def verify_bundle(
    bundle: dict[str, Any],
    pinned_key: str | None,
    *,
    trust_bundle_key: bool = False,
    witnesses: Sequence[WitnessVerifier] = (),
    quorum: int = 0,
) -> Report:
    """Verify a bundle (see the module docstring for the checks); problems are collected, not raised.

    Without ``pinned_key`` the report fails (every other check still runs against the bundle's own
    key, to say what else is wrong) unless ``trust_bundle_key`` is set explicitly.
    """
    report = Report(origin=str(bundle.get("origin", "")))
    if bundle.get("format") != BUNDLE_FORMAT:
        report.problems.append(f"unknown bundle format {bundle.get('format')!r}")
        return report
    # 1. The key: a bundle could carry any key, so a pinned key from the lab's own channel decides.
    try:
        verifier = Verifier.parse(str(bundle.get("public_key", "")))
        if pinned_key is not None:
            pinned = Verifier.parse(pinned_key)
            report.key_pinned = True
            if pinned.vkey() != verifier.vkey():
                report.problems.append("the bundle's key is not the pinned key")
                verifier = pinned
        elif not trust_bundle_key:
            report.problems.append(UNPINNED)
    except NoteError as exc:
        report.problems.append(f"public key: {exc}")
        return report
    # 2. Signatures and origin of every checkpoint.
    heads: list[tuple[int, bytes]] = []
    notes: list[tuple[int, str]] = []
    for n, note in enumerate(bundle.get("checkpoints", [])):
        try:
            cp = verify_checkpoint(note, verifier, report.origin)
        except NoteError as exc:
            report.problems.append(f"checkpoint {n}: {exc}")
            continue
        heads.append((cp.size, cp.root))
        notes.append((cp.size, note))
    report.checkpoints = len(heads)
    if not heads:
        report.problems.append("the bundle has no valid checkpoint")
        return report
    # 3. Sizes only grow; each later checkpoint is consistent with the earlier ones.
    for (a, ra), (b, rb) in itertools.pairwise(heads):
        if b < a or (a == b and ra != rb):
            report.problems.append(f"checkpoint of size {b} (root changed or size shrank) follows size {a}")
    proofs = {(p["old"], p["new"]): p["proof"] for p in bundle.get("consistency", [])}
    roots = dict(heads)
    sizes = sorted({s for s, _ in heads if s > 0})
    for a, b in itertools.pairwise(sizes):
        try:
            proof = [_b64d(h) for h in proofs[(a, b)]]
            verify_consistency(a, b, proof, roots[a], roots[b])
        except KeyError:
            report.problems.append(f"no consistency proof from size {a} to {b}")
        except (ProofError, ValueError) as exc:
            report.problems.append(f"checkpoint {b} is not consistent with checkpoint {a}: {exc}")
    # 4. Entries: canonical, and the tree they build has every signed root; inclusion of each.
    texts = list(bundle.get("entries", []))
    report.size = max(roots)
    if len(texts) != report.size:
        report.problems.append(f"the bundle has {len(texts)} entries but the newest checkpoint covers {report.size}")
    tree = MemoryTree()
    for i, text in enumerate(texts):
        try:
            report.entries.append(parse_entry(text))
        except (ValueError, TypeError) as exc:
            report.problems.append(f"entry {i}: {exc}")
            report.entries.append({})
        tree.append(leaf_hash(text.encode()))
    for size, root in heads:
        if size <= len(tree) and tree.root(size) != root:
            report.problems.append(f"the entries do not hash to the signed root at size {size}")
    newest_root, bad = roots[report.size], 0
    for i in range(report.size if len(tree) >= report.size else 0):
        try:
            verify_inclusion(tree.levels[0][i], i, report.size, tree.inclusion_proof(i, report.size), newest_root)
        except ProofError:
            bad += 1
    if bad:
        report.problems.append(f"{bad} entries have no valid inclusion proof under the newest signed root")
    # 6. Witnesses: the newest checkpoint a quorum cosigned is the one the answers rest on.
    if quorum:
        _check_quorum(report, notes, witnesses, quorum)
    # 7. Evaluators' acceptances of grant terms re-verify from the entry alone.
    issued = {e["body"].get("grant") for e in report.entries if e.get("kind") == "grant.issued"}
    for e in report.entries:
        if e.get("kind") == "grant.accepted":
            report.problems += [f"grant.accepted {e.get('id')}: {p}" for p in acceptance_problems(e["body"], issued)]
    # 5. Reveals must open the commitments they name.
    by_id = {e["id"]: e for e in report.entries if e}
    for e in report.entries:
        if e.get("kind") != "commitment.revealed":
            continue
        target = by_id.get(e["body"].get("event"), {})
        for opening in e["body"].get("openings", []):
            commitment = target.get("commitments", {}).get(opening.get("field"))
            if commitment is None or not verify_opening(commitment, opening.get("salt", ""), opening.get("value")):
                report.problems.append(
                    f"reveal {e['id']}: does not open {e['body'].get('event')}/{opening.get('field')}"
                )
    return report


ACCEPTANCE_FORMAT = "airlock.grant-acceptance/v1"


def acceptance_problems(body: dict[str, Any], issued: set[Any]) -> list[str]:
    """Return what is wrong with one ``grant.accepted`` body: its signature, its key's fingerprint, its grant."""
    problems: list[str] = []
    document = {
        "format": ACCEPTANCE_FORMAT,
        "grant_id": body.get("grant"),
        "terms_sha256": body.get("terms_sha256"),
        "seal_public_key": body.get("seal_public_key"),
        "accepted_at": body.get("accepted_at"),
    }
    if body.get("format") != ACCEPTANCE_FORMAT:
        problems.append(f"unknown acceptance format {body.get('format')!r}")
    try:
        raw_key = base64.b64decode(str(body.get("signing_public_key", "")), validate=True)
        if hashlib.sha256(raw_key).hexdigest() != body.get("key_fingerprint"):
            problems.append("the signing key's fingerprint is not the SHA-256 of its public key")
        public = Ed25519PublicKey.from_public_bytes(raw_key)
        public.verify(base64.b64decode(str(body.get("signature", "")), validate=True), canonical_bytes(document))
    except (ValueError, binascii.Error, CanonicalJSONError, InvalidSignature):
        problems.append("its signature does not verify over the acceptance document it records")
    if body.get("grant") not in issued:
        problems.append(f"accepts grant {body.get('grant')}, which has no grant.issued entry in this bundle")
    return problems


def _b64d(value: str) -> bytes:
    return base64.b64decode(value, validate=True)


def _check_quorum(
    report: Report, notes: Sequence[tuple[int, str]], witnesses: Sequence[WitnessVerifier], k: int
) -> None:
    distinct = {w.vkey(): w for w in witnesses}
    if k > len(distinct):
        report.problems.append(f"a quorum of {k} needs at least {k} distinct witness keys ({len(distinct)} given)")
        return
    for size, note in sorted(notes, key=lambda n: n[0], reverse=True):
        try:
            valid, bad = cosignatures(note, list(distinct.values()))
        except NoteError as exc:
            report.problems.append(f"checkpoint of size {size}: {exc}")
            continue
        report.problems.extend(f"checkpoint of size {size}: {b}" for b in bad)
        if len(valid) >= k:
            report.witnessed_size = size
            report.witnessed_by = sorted(c.name for c in valid)
            return
    report.problems.append(f"no checkpoint carries valid cosignatures by {k} of the given witnesses")


# ---------------------------------------------------------------- the public questions


@dataclass
class AccessRow:
    """One evaluator's access to one model version, as the ledger shows it."""

    version: str
    version_hash: str
    evaluator: str
    grant: str
    scopes: list[str]
    variants: list[str]
    access_from: datetime
    access_until: datetime | None
    deployed_at: datetime | None
    results: list[str]

    @property
    def days_before_deployment(self) -> float | None:
        """Days between the start of access and deployment (``None`` if not deployed)."""
        if self.deployed_at is None:
            return None
        return (self.deployed_at - self.access_from).total_seconds() / 86400


def access_table(entries: Sequence[dict[str, Any]], model: str, version: str | None = None) -> list[AccessRow]:
    """Answer "for model X (version V), who had which access, how long before deployment, and what was attested"."""
    deployed: dict[str, datetime] = {}
    revoked: dict[str, datetime] = {}
    results: dict[tuple[str, str], list[str]] = {}
    for e in entries:
        kind, body = e.get("kind"), e.get("body", {})
        if kind == "stage.changed" and body.get("to") == "deployed":
            deployed.setdefault(body["version"]["hash"], parse_time(e["time"]))
        elif kind == "grant.revoked":
            revoked[body["grant"]] = parse_time(body.get("revoked_at") or e["time"])
        elif kind == "eval.attested":
            metrics = body.get("metrics")
            shown = (
                ", ".join(f"{k}={_metric(v)}" for k, v in sorted(metrics.items()))
                if isinstance(metrics, dict)
                else "metrics committed (embargo)"
            )
            suite, task = body.get("suite"), body.get("task")
            name = task if suite in (None, task) else f"{suite}/{task}"
            results.setdefault((body.get("grant", ""), body["version"].get("hash", "")), []).append(
                f"{name} [{body.get('variant')}] {shown} (log {body.get('log_sha256', '')[:12]}…, at {e['time'][:10]})"
            )
    rows: list[AccessRow] = []
    for e in entries:
        if e.get("kind") != "grant.issued" or e["body"].get("model") != model:
            continue
        body = e["body"]
        issued = parse_time(e["time"])
        start = max(issued, parse_time(body["not_before"])) if body.get("not_before") else issued
        ends = [parse_time(body["not_after"])] if body.get("not_after") else []
        if body["grant"] in revoked:
            ends.append(revoked[body["grant"]])
        for v in body.get("versions", []):
            if version is not None and version not in (v["label"], v["hash"]) and not v["hash"].startswith(version):
                continue
            rows.append(
                AccessRow(
                    version=v["label"],
                    version_hash=v["hash"],
                    evaluator=body["evaluator"],
                    grant=body["grant"],
                    scopes=list(body.get("scopes", [])),
                    variants=list(body.get("variants", [])),
                    access_from=start,
                    access_until=min(ends) if ends else None,
                    deployed_at=deployed.get(v["hash"]),
                    results=results.get((body["grant"], v["hash"]), []),
                )
            )
    rows.sort(key=lambda r: (r.version, r.access_from, r.evaluator))
    return rows


def _metric(value: Any) -> str:
    if isinstance(value, dict) and "value" in value:
        value = value["value"]
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _day(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d") if value else "-"


def render_access(rows: Sequence[AccessRow], model: str) -> str:
    """Render the access table as readable text."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Access to {model} recorded in the ledger", show_lines=True)
    for col in ("version", "evaluator", "scopes", "variants", "access", "deployed", "days before", "attested results"):
        table.add_column(col)
    for r in rows:
        days = r.days_before_deployment
        table.add_row(
            f"{r.version}\n{r.version_hash[:12]}…",
            f"{r.evaluator}\n{r.grant}",
            ", ".join(r.scopes),
            ", ".join(r.variants),
            f"{_day(r.access_from)} → {_day(r.access_until)}",
            _day(r.deployed_at),
            "not deployed" if days is None else f"{days:.1f}",
            "\n".join(r.results) or "none",
        )
    out = StringIO()
    Console(file=out, width=160, force_terminal=False).print(table)
    return out.getvalue()


# ---------------------------------------------------------------- command line


UNSAFE_WARNING = (
    "WARNING: --unsafe-trust-bundle-key: the key inside the bundle was trusted; anyone who rewrote "
    "this bundle could have signed it with their own key. Pin the lab's key with --key."
)


def _read_key(key: str) -> str:
    return Path(key).read_text().strip() if Path(key).is_file() else key


def parse_witnesses(keys: Sequence[str]) -> list[WitnessVerifier]:
    """Parse witness verifier keys given as strings or files (raise NoteError on a bad one)."""
    return [WitnessVerifier.parse(_read_key(k)) for k in keys]


def run(
    bundle_path: Path,
    *,
    key: str | None,
    model: str | None,
    version: str | None,
    trust_bundle_key: bool = False,
    witnesses: Sequence[str] = (),
    quorum: int | None = None,
) -> tuple[int, str]:
    """Verify a bundle file and return ``(exit code, text to print)``."""
    try:
        bundle = json.loads(bundle_path.read_text())
    except (OSError, ValueError) as exc:
        return 2, f"cannot read bundle {bundle_path}: {exc}"
    if key is not None:
        key = _read_key(key)
    try:
        witness_keys = parse_witnesses(witnesses)
    except NoteError as exc:
        return 2, f"bad witness key: {exc}"
    if quorum is not None and not witness_keys:
        return 2, "--quorum needs the witnesses' keys (--witness KEY, once per witness)"
    # Fail closed: naming witnesses without a quorum asks for all of them.
    k = (quorum if quorum is not None else len(witness_keys)) if witness_keys else 0
    try:
        report = verify_bundle(bundle, key, trust_bundle_key=trust_bundle_key, witnesses=witness_keys, quorum=k)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        # Fail closed on a bundle that is not even well-formed.
        return 1, f"FAILED: malformed bundle ({type(exc).__name__}: {exc})"
    lines = [
        f"origin: {report.origin}",
        f"entries: {report.size}; checkpoints: {report.checkpoints}",
        "key: pinned and matching" if report.key_pinned and report.ok else "key: taken from the bundle",
    ]
    if key is None and trust_bundle_key:
        lines.append(UNSAFE_WARNING)
    if not report.ok:
        lines += ["FAILED:", *(f"  - {p}" for p in report.problems)]
        return 1, "\n".join(lines)
    entries = report.entries
    if report.witnessed_size is not None:
        lines.append(
            f"witnessed: checkpoint of size {report.witnessed_size} cosigned by {', '.join(report.witnessed_by)} "
            f"(quorum {k} of {len(witness_keys)})"
        )
        if report.witnessed_size < report.size:
            lines.append(
                f"note: the {report.size - report.witnessed_size} newest entries are signed by the lab but not yet "
                "witnessed; the answers below leave them out"
            )
        entries = entries[: report.witnessed_size]
    lines.append("OK: signatures, consistency, every entry's inclusion and every reveal verified")
    if model:
        lines.append(render_access(access_table(entries, model, version), model))
    return 0, "\n".join(lines)


def run_evidence(path: Path, key: str) -> tuple[int, str]:
    """Check a witness's refusal records (``airlock witness evidence``) against the log's key."""
    from airlock.ledger.witness import check_evidence

    try:
        data = json.loads(path.read_text())
        log = Verifier.parse(_read_key(key))
    except (OSError, ValueError) as exc:
        return 2, f"cannot read evidence {path}: {exc}"
    records = data if isinstance(data, list) else [data]
    lines, forks = [], 0
    for record in records:
        proven, why = check_evidence(record if isinstance(record, dict) else {}, log)
        forks += proven
        where = f"{record.get('witness', '?')} #{record.get('id', '?')}" if isinstance(record, dict) else "?"
        lines.append(f"{'FORK' if proven else 'no fork'} ({where}): {why}")
    lines.append(f"{forks} of {len(records)} record(s) prove that {log.name} showed a fork")
    return (0 if forks else 1), "\n".join(lines)


def run_model_report(path: Path, key: str, witnesses: Sequence[str], quorum: int | None) -> tuple[int, str]:
    """Re-check a Model Report section (JSON, or Markdown with its JSON block) offline."""
    from airlock.ledger.model_report import extract_json, render_markdown, verify_model_report

    try:
        text = path.read_text()
        report = extract_json(text)
        witness_keys = parse_witnesses(witnesses)
    except (OSError, ValueError, NoteError) as exc:
        return 2, f"cannot read the Model Report {path}: {exc}"
    k = (quorum if quorum is not None else len(witness_keys)) if witness_keys else 0
    try:
        problems = verify_model_report(report, _read_key(key), witnesses=witness_keys, quorum=k)
        # The Markdown is a rendering of the JSON: any edit to its text is an edit to the report.
        if not text.lstrip().startswith("{") and render_markdown(report) != text:
            problems.append("the Markdown text differs from the rendering of its verifiable record")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        problems = [f"malformed report ({type(exc).__name__}: {exc})"]
    name = f"{report.get('model')}@{report.get('version')}"
    if problems:
        return 1, "\n".join([f"Model Report {name}: FAILED", *(f"  - {p}" for p in problems)])
    statements = len(report.get("statements", []))
    witnessed = f", cosigned by a quorum of {k}" if k else ""
    return 0, (
        f"Model Report {name}: OK: {statements} statements re-derived from {len(report.get('entries', []))} "
        f"ledger entries, each proven in the signed checkpoint{witnessed}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``airlock-verify``."""
    parser = argparse.ArgumentParser(
        prog="airlock-verify",
        description="Verify an Airlock ledger bundle offline: checkpoint signatures, consistency, the inclusion "
        "of every entry and every reveal; optionally witness cosignatures, and who had access to a model before "
        "deployment. Also checks a witness's fork evidence.",
    )
    parser.add_argument("bundle", type=Path, nargs="?", help="bundle written by `airlock ledger export`")
    parser.add_argument(
        "--key", help="the lab's verifier key (string or file), from `airlock ledger pubkey`; required to pass"
    )
    parser.add_argument(
        "--unsafe-trust-bundle-key",
        action="store_true",
        help="trust the key inside the bundle instead of a pinned one (unsafe: prints a warning)",
    )
    parser.add_argument(
        "--witness",
        action="append",
        default=[],
        metavar="KEY",
        help="a witness's verifier key (string or file); repeat for each witness",
    )
    parser.add_argument(
        "--quorum", type=int, help="how many of the witnesses must have cosigned (default: all of them)"
    )
    parser.add_argument(
        "--evidence", type=Path, help="check a witness's refusal records (`airlock witness evidence`) instead"
    )
    parser.add_argument(
        "--model-report", type=Path, help="re-check a Model Report section (`airlock model-report`) instead"
    )
    parser.add_argument("--model", help="answer the access questions for this model")
    parser.add_argument("--version", help="restrict to one version (label or content-hash prefix)")
    args = parser.parse_args(argv)
    if args.evidence is not None:
        if not args.key:
            parser.error("--evidence needs the log's key (--key)")
        code, text = run_evidence(args.evidence, args.key)
    elif args.model_report is not None:
        if not args.key:
            parser.error("--model-report needs the lab's key (--key)")
        code, text = run_model_report(args.model_report, args.key, args.witness, args.quorum)
    elif args.bundle is None:
        parser.error("give a bundle (or --evidence FILE)")
    else:
        code, text = run(
            args.bundle,
            key=args.key,
            model=args.model,
            version=args.version,
            trust_bundle_key=args.unsafe_trust_bundle_key,
            witnesses=args.witness,
            quorum=args.quorum,
        )
    print(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
