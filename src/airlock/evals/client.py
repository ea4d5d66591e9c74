"""Evaluator-side helpers: talk to a lab's Airlock, sign and submit results, run suites."""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from nacl.public import PrivateKey

from airlock.canonical import canonical_bytes, iso_utc, sha256_hex
from airlock.config import get_settings
from airlock.errors import AirlockError, AuthenticationError, InvalidRequestError
from airlock.evals.attestation import fingerprint, load_private_key, public_key_b64, sign
from airlock.evals.reporting import LogSummary, build_attestation, summarize_log
from airlock.evals.suites import SUITE_MODULES, suite_task


def default_key_path() -> Path:
    """Return where the evaluator's signing key lives by default."""
    return get_settings().home_dir / "evaluator" / "signing-key.pem"


def default_seal_key_path(signing_key: Path | None = None) -> Path:
    """Return where the evaluator's X25519 sealing key lives: ``seal.key`` beside the signing key."""
    return (signing_key or default_key_path()).parent / "seal.key"


def generate_seal_key(path: Path) -> PrivateKey:
    """Create an X25519 sealing key and write its raw 32 bytes, base64, readable only by the owner."""
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite a sealing key")
    key = PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(base64.b64encode(bytes(key)).decode() + "\n")
    return key


def load_seal_key(path: Path) -> PrivateKey:
    """Read the X25519 sealing key written by :func:`generate_seal_key` (ValueError if it is not one)."""
    raw = base64.b64decode(path.read_text().strip(), validate=True)
    if len(raw) != 32:
        raise ValueError(f"{path} does not hold a raw 32-byte X25519 key")
    return PrivateKey(raw)


def seal_public_key_b64(key: PrivateKey) -> str:
    """Return the sealing key's public half (raw 32 bytes), base64."""
    return base64.b64encode(bytes(key.public_key)).decode()


def acceptance_document(grant_id: str, terms_sha256: str, seal_public_key: str, accepted_at: str) -> dict[str, Any]:
    """Return the acceptance document the evaluator signs (``airlock.grant-acceptance/v1``)."""
    return {
        "format": "airlock.grant-acceptance/v1",
        "grant_id": grant_id,
        "terms_sha256": terms_sha256,
        "seal_public_key": seal_public_key,
        "accepted_at": accepted_at,
    }


def sign_acceptance(
    proposed: dict[str, Any], signing_path: Path, seal_path: Path, *, now: datetime | None = None
) -> dict[str, Any]:
    """Check the proposal's hash, then sign its acceptance; return the body of ``POST /airlock/grant/accept``.

    The hash is recomputed here from the proposal as received (RFC 8785, SHA-256), so what is signed
    is the document the evaluator was shown, not a number the lab sent beside it.
    """
    digest = sha256_hex(proposed["proposal"])
    if digest != proposed["terms_sha256"]:
        raise AirlockError("the lab's terms_sha256 is not the hash of the terms it sent; not signing")
    signing = load_private_key(signing_path)
    seal = seal_public_key_b64(load_seal_key(seal_path))
    accepted_at = iso_utc(now or datetime.now(UTC))
    document = acceptance_document(proposed["grant_id"], digest, seal, accepted_at)
    public = public_key_b64(signing)
    return {
        "terms_sha256": digest,
        "seal_public_key": seal,
        "accepted_at": accepted_at,
        "signature": base64.b64encode(signing.sign(canonical_bytes(document))).decode(),
        "key_fingerprint": fingerprint(public),
    }


@dataclass
class LabClient:
    """A small client for the evaluator endpoints of a lab's Airlock."""

    base_url: str
    api_key: str

    @classmethod
    def from_env(cls) -> LabClient:
        """Build from ``AIRLOCK_BASE_URL`` (``http://host:port/v1``) and ``AIRLOCK_API_KEY``."""
        base = os.environ.get("AIRLOCK_BASE_URL")
        key = os.environ.get("AIRLOCK_API_KEY")
        if not base or not key:
            raise InvalidRequestError("set AIRLOCK_BASE_URL (e.g. http://lab:8000/v1) and AIRLOCK_API_KEY")
        return cls(base.rstrip("/"), key)

    def send(self, method: str, path: str, *, timeout: float = 60, **kwargs: Any) -> httpx.Response:
        """Send one authenticated request to ``base_url + path``; HTTP errors become AirlockErrors."""
        try:
            resp = httpx.request(
                method,
                self.base_url + path,
                headers={"Authorization": f"Bearer {self.api_key}"},
                timeout=timeout,
                **kwargs,
            )
        except httpx.HTTPError as exc:
            raise AirlockError(f"cannot reach {self.base_url}: {exc}") from None
        if resp.status_code >= 400:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:300]
            error = AuthenticationError if resp.status_code == 401 else AirlockError
            raise error(f"{method} {path}: HTTP {resp.status_code}: {message}")
        return resp

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.send(method, path, **kwargs).json()

    def grant(self) -> dict[str, Any]:
        """Return the caller's grant."""
        result: dict[str, Any] = self._request("GET", "/airlock/grant")
        return result

    def variant_info(self, model_id: str) -> dict[str, Any]:
        """Return provenance (version hash, mitigations, grant) of a granted variant."""
        result: dict[str, Any] = self._request("GET", f"/airlock/models/{model_id}")
        return result

    def register_key(self, public_key: str) -> dict[str, Any]:
        """Register the evaluator's signing key with the lab."""
        result: dict[str, Any] = self._request("POST", "/airlock/signing-keys", json={"public_key": public_key})
        return result

    def proposed_terms(self) -> dict[str, Any]:
        """Return the terms the lab proposes for the caller's grant, their hash and the acceptance state."""
        result: dict[str, Any] = self._request("GET", "/airlock/grant/terms")
        return result

    def accept_terms(self, body: dict[str, Any]) -> dict[str, Any]:
        """Send a signed acceptance of the grant's terms."""
        result: dict[str, Any] = self._request("POST", "/airlock/grant/accept", json=body)
        return result

    def submit(self, envelope: dict[str, Any]) -> dict[str, Any]:
        """Submit a signed result."""
        result: dict[str, Any] = self._request("POST", "/airlock/results", json=envelope)
        return result

    def results(self) -> list[dict[str, Any]]:
        """List the organisation's accepted results."""
        result: list[dict[str, Any]] = self._request("GET", "/airlock/results")
        return result

    def elicitation(self, model_version: str, task: str) -> dict[str, Any]:
        """Return the elicitation report of one task on ``model@version`` over the organisation's results."""
        params = {"model": model_version, "task": task}
        result: dict[str, Any] = self._request("GET", "/airlock/results/elicitation", params=params)
        return result


def find_logs(paths: Sequence[Path]) -> list[Path]:
    """Expand files and directories into ``.eval`` log files, sorted."""
    logs: list[Path] = []
    for path in paths:
        if path.is_dir():
            logs.extend(sorted(path.rglob("*.eval")))
        elif path.suffix == ".eval" and path.exists():
            logs.append(path)
        else:
            raise InvalidRequestError(f"{path} is neither an .eval log nor a directory")
    return logs


def provenance_for(summary: LogSummary, lab: LabClient) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the target's provenance and where it came from: the log, else the lab asked now.

    What the log recorded wins: it is what the eval actually ran against, even if the lab has
    registered a newer version since. Logs made with the stock ``openai-api`` provider carry no
    provenance; the lab's description of the variant is then looked up at submission, and the
    attestation says so, pinned to the version and hash the lookup resolved.
    """
    from inspect_ai.log import read_eval_log

    # Inspect's provider stack loads only for commands that read eval logs.
    from airlock.evals.provider import provenance_from_log

    try:
        record = provenance_from_log(read_eval_log(str(summary.path)))
    except ValueError:
        info = lab.variant_info(summary.model_id)
        source = {
            "from": "lab_lookup_at_submission",
            "looked_up_at": datetime.now(UTC).isoformat(),
            "version": info.get("version"),
            "version_hash": info.get("version_hash"),
        }
        return info, source
    variant: dict[str, Any] = record["variant"]
    return variant, {"from": "log"}


def attest_and_submit(log: Path, lab: LabClient, key_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build, sign and submit the attestation of one log; returns (envelope, lab's stored result)."""
    summary = summarize_log(log)
    provenance, source = provenance_for(summary, lab)
    attestation = build_attestation(summary, provenance, evaluator=lab.grant()["evaluator"], provenance_source=source)
    envelope = sign(attestation, load_private_key(key_path))
    log.with_suffix(".attestation.json").write_text(json.dumps(envelope, indent=2, sort_keys=True))
    return envelope, lab.submit(envelope)


def resolve_tasks(names: Sequence[str], task_args: dict[str, Any]) -> list[Any]:
    """Turn suite names or Inspect task files into Inspect tasks / task specs."""
    tasks: list[Any] = []
    used: set[str] = set()
    for name in names:
        if name in SUITE_MODULES:
            task_fn = suite_task(name)
            # One -T list serves several suites: give each suite the arguments it declares.
            accepted = inspect.signature(task_fn).parameters
            args = {k: v for k, v in task_args.items() if k in accepted}
            used.update(args)
            tasks.append(task_fn(**args))
        elif Path(name.split("@", 1)[0]).exists():
            tasks.extend(_file_task_specs(name))
        else:
            raise InvalidRequestError(
                f"{name!r} is neither a built-in suite ({', '.join(SUITE_MODULES)}) nor an Inspect task file"
            )
    unused = set(task_args) - used
    if unused and all(name in SUITE_MODULES for name in names):
        raise InvalidRequestError(f"no selected suite takes the task argument(s) {sorted(unused)}")
    return tasks


def _file_task_specs(spec: str) -> list[str]:
    # Inspect only globs task files relative to the working directory; an absolute `file@task`
    # spec always works, so expand a bare file into one spec per task it defines.
    from inspect_ai import list_tasks

    path_text, _, task_name = spec.partition("@")
    path = Path(path_text).resolve()
    if task_name:
        return [f"{path}@{task_name}"]
    names = [info.name for info in list_tasks(path.name, root_dir=path.parent)]
    if not names:
        raise InvalidRequestError(f"{path} defines no Inspect @task")
    return [f"{path}@{name}" for name in names]


def run_dir_name(names: Sequence[str], models: Sequence[str], options: dict[str, Any]) -> str:
    """Return a stable directory name for a run, so re-running it resumes the same eval set."""
    key = json.dumps({"tasks": sorted(names), "models": sorted(models), **options}, sort_keys=True, default=str)
    return "run-" + hashlib.sha256(key.encode()).hexdigest()[:12]
