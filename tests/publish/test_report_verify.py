"""`airlock report verify` offline: results tied to the hashed document, key pinning, malformed input."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from airlock.evals.attestation import fingerprint, sign
from airlock.publish import redaction
from airlock.publish.cli import app
from airlock.publish.service import UNPINNED_EVALUATOR_KEY, content_hash, verify_public_report
from tests.fakes import fake_attestation

runner = CliRunner()
KEY = Ed25519PrivateKey.generate()
PINNED = [fingerprint(sign({}, KEY)["public_key"])]


def public_report(*envelopes: dict[str, Any]) -> dict[str, Any]:
    """A public report JSON citing ``envelopes`` (signed results), with one revealed redaction."""
    salt = bytes(range(32))
    commitment = redaction.commit("secret", salt)
    envelopes = envelopes or (sign(fake_attestation("grt_1", log_sha256="1" * 64), KEY),)
    results = [
        {"id": f"res_{i}", "signature": env["signature"], "log_sha256": env["attestation"]["log_sha256"]}
        for i, env in enumerate(envelopes)
    ]
    document = {
        "schema": "airlock.report/v1",
        "report_id": "rpt_1",
        "revision": 1,
        "previous_hash": None,
        "evaluator": "org-a",
        "model": "m1",
        "version": "v1",
        "version_hash": "a" * 64,
        "title": "t",
        "body": f"x {redaction.placeholder(1, '', commitment)}",
        "results": results,
        "attachments": [],
        "redactions": [{"number": 1, "reason": "", "commitment": commitment}],
    }
    return {
        "id": "rpt_1",
        "document": document,
        "content_hash": content_hash(document),
        "redactions": [{"number": 1, "commitment": commitment, "revealed": True, "salt": salt.hex(), "text": "secret"}],
        "results": [
            {"id": ref["id"], "log_sha256": ref["log_sha256"], **env}
            for ref, env in zip(results, envelopes, strict=True)
        ],
    }


def verify_cli(tmp_path: Path, data: Any, *args: str, raw: str | None = None, pin: bool = True) -> tuple[int, str]:
    path = tmp_path / "report.json"
    path.write_text(raw if raw is not None else json.dumps(data))
    pinned = ["--key", PINNED[0]] if pin and "--key" not in args and "--evaluator-key" not in args else []
    result = runner.invoke(app, ["verify", str(path), *pinned, *args], env={"COLUMNS": "400"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output


def test_a_genuine_report_verifies_and_names_the_signing_key(tmp_path: Path) -> None:
    data = public_report()
    check = verify_public_report(data, PINNED)
    fp = fingerprint(data["results"][0]["public_key"])
    assert check.ok and check.revealed == 1 and check.signers == [("res_0", fp)]
    code, out = verify_cli(tmp_path, data)
    assert code == 0 and f"res_0: signature verified with key sha256:{fp}" in out and out.count("OK:") == 1
    assert "(pinned)" in out
    # Pinning the evaluator's key (base64 or fingerprint) accepts it; any other key is a failure.
    assert verify_cli(tmp_path, data, "--evaluator-key", data["results"][0]["public_key"])[0] == 0
    assert verify_cli(tmp_path, data, "--evaluator-key", fp)[0] == 0
    other = sign({"x": 1}, Ed25519PrivateKey.generate())["public_key"]
    code, out = verify_cli(tmp_path, data, "--evaluator-key", other)
    assert code == 1 and "not a pinned evaluator key" in out


def test_a_swapped_in_attestation_signed_by_another_key_fails(tmp_path: Path) -> None:
    # The reviewer's probe: a mirrored report keeps the hashed document but shows another
    # attestation, validly signed by a throwaway key. It used to print OK.
    data = public_report()
    forged = sign(fake_attestation("grt_1", log_sha256="1" * 64, metrics={}), Ed25519PrivateKey.generate())
    data["results"][0].update(forged)
    code, out = verify_cli(tmp_path, data)
    assert code == 1 and "OK" not in out
    assert "res_0: signature differs from the hashed document" in out


def test_results_must_be_exactly_those_of_the_hashed_document(tmp_path: Path) -> None:
    data = public_report()
    extra = copy.deepcopy(data["results"][0]) | {"id": "res_extra"}
    assert (
        "result res_extra: not cited by the hashed document"
        in verify_public_report(data | {"results": [*data["results"], extra]}, PINNED).problems
    )
    code, out = verify_cli(tmp_path, data | {"results": []})
    assert code == 1 and "res_0: cited by the hashed document but missing from the report" in out
    twice = verify_public_report(data | {"results": data["results"] * 2}, PINNED).problems
    assert twice == ["result res_0: listed twice"]


def test_the_log_hash_must_match_the_hashed_document() -> None:
    # Same key, same signature bytes cannot carry another attestation; but the shown log hash
    # must agree with the hashed one as well.
    data = public_report()
    data["results"][0]["log_sha256"] = "2" * 64
    assert verify_public_report(data, PINNED).problems == ["result res_0: log_sha256 differs from the hashed document"]
    other = sign(fake_attestation("grt_1", log_sha256="2" * 64), KEY)
    data = public_report()
    data["results"][0].update(other)
    problems = verify_public_report(data, PINNED).problems
    assert "result res_0: signature differs from the hashed document" in problems
    assert "result res_0: log_sha256 differs from the hashed document" in problems


def test_results_about_another_evaluator_or_version_fail() -> None:
    env = sign(fake_attestation("grt_1", evaluator="org-b", version_hash="b" * 64), KEY)
    problems = verify_public_report(public_report(env), PINNED).problems
    assert "result res_0: attested by 'org-b', not the report's evaluator" in problems
    assert "result res_0: attests another model version than the report" in problems


def _drop(data: dict[str, Any], key: str) -> dict[str, Any]:
    data["results"][0].pop(key)
    return data


def _set(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    data["results"][0][key] = value
    return data


MALFORMED: list[tuple[str, Any, str]] = [
    ("not an object", [1, 2], "not a JSON object"),
    ("no document", {"id": "rpt_1"}, "carries no document"),
    ("redaction not an object", public_report() | {"redactions": ["x", 3]}, "redactions: 'x' is not an object"),
    ("redactions not a list", public_report() | {"redactions": "x"}, "redactions is not a list"),
    ("result without attestation", _drop(public_report(), "attestation"), "attestation, signature or public key"),
    ("result without id", public_report() | {"results": [{"attestation": {}}]}, "is not a result"),
    ("result not an object", public_report() | {"results": ["res_0"]}, "'res_0' is not a result"),
    ("results not a list", public_report() | {"results": {"res_0": 1}}, "results is not a list"),
    ("unhashable number", public_report() | {"redactions": [{"number": [1], "revealed": True}]}, "#[1]: commitment"),
    ("unhashable log hash", _set(public_report(), "log_sha256", ["x"]), "res_0: log_sha256 differs"),
    ("bad public key", _set(public_report(), "public_key", "nope"), "res_0: signature does not verify"),
    ("attestation not an object", _set(public_report(), "attestation", "x"), "attestation, signature or public key"),
]


@pytest.mark.parametrize(("data", "problem"), [(d, p) for _, d, p in MALFORMED], ids=[n for n, _, _ in MALFORMED])
def test_malformed_reports_are_problems_not_tracebacks(tmp_path: Path, data: Any, problem: str) -> None:
    check = verify_public_report(data, PINNED)
    assert not check.ok and any(problem in line for line in check.problems), check.problems
    code, out = verify_cli(tmp_path, data)
    assert code == 1 and "FAIL" in out and problem in out and "Traceback" not in out


def test_malformed_documents_are_problems_not_tracebacks() -> None:
    data = public_report()
    data["document"]["redactions"] = [{"number": [1]}]
    data["document"]["results"] = [{"signature": "s"}, "y"]
    data["document"]["body"] = 7
    problems = verify_public_report(data, PINNED).problems
    assert "document.redactions is not a list of numbered redactions" in problems
    assert "document.body is not a string" in problems
    assert sum("is not a result reference" in p for p in problems) == 2
    assert "result res_0: not cited by the hashed document" in problems
    data = public_report()
    data["document"]["title"] = float("nan")  # not canonical JSON
    assert "the document cannot be canonicalised (not plain JSON)" in verify_public_report(data, PINNED).problems


def test_a_file_that_is_not_json_is_a_clean_failure(tmp_path: Path) -> None:
    code, out = verify_cli(tmp_path, None, raw="{not json")
    assert code == 1 and out.startswith("FAIL not a JSON document")
    code, out = verify_cli(tmp_path, public_report() | {"id": "rpt_other"})
    assert code == 1 and "differs from the hashed document's report_id" in out


def test_trust_fails_closed_without_a_pinned_key(tmp_path: Path) -> None:
    # A forger who re-signs every result with their own key passes any check that trusts the
    # report's embedded keys; without a pinned key the check does not pass.
    data = public_report()
    check = verify_public_report(data, None)
    assert not check.ok and check.problems == [UNPINNED_EVALUATOR_KEY]
    code, out = verify_cli(tmp_path, data, pin=False)
    assert code == 1 and "no evaluator key is pinned" in out and "OK:" not in out
    # The explicit unsafe flag passes a sound report, loudly...
    code, out = verify_cli(tmp_path, data, "--unsafe-trust-embedded-keys", pin=False)
    assert code == 0 and "WARNING" in out and "key NOT pinned" in out
    # ...and still fails on anything else wrong.
    data["results"][0]["log_sha256"] = "2" * 64
    code, out = verify_cli(tmp_path, data, "--unsafe-trust-embedded-keys", pin=False)
    assert code == 1 and "log_sha256 differs" in out
    # A report with no signed results has no signer to pin: nothing in it rests on a key.
    unsigned = public_report()
    unsigned["document"]["results"], unsigned["results"] = [], []
    unsigned["content_hash"] = content_hash(unsigned["document"])
    assert verify_public_report(unsigned, None).ok
