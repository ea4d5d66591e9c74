"""Each package declares its public API (``__all__``), the declarations are pinned, and no package reaches past them."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "airlock"
PACKAGES = sorted(p.name for p in SRC.iterdir() if (p / "__init__.py").is_file())


def declared(package: str) -> list[str]:
    """Return the package's ``__all__``, read from its source (nothing is imported)."""
    for node in ast.parse((SRC / package / "__init__.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            value = ast.literal_eval(node.value)
            assert isinstance(value, list)
            return [str(name) for name in value]
    raise AssertionError(f"airlock.{package} declares no __all__")


def _module_of(path: Path) -> str:
    return ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")


def imports_across_packages() -> Iterator[tuple[str, str, str]]:
    """Yield ``(importing module, package, name)`` for every import of another package's module or name."""
    for path in sorted(SRC.rglob("*.py")):
        module = _module_of(path)
        own = module.split(".")[1] if module.count(".") else ""
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("airlock."):
                parts = (node.module or "").split(".")
                names = [a.name for a in node.names] if len(parts) == 2 else [parts[2]]
            elif isinstance(node, ast.Import):
                found = [a.name.split(".") for a in node.names if a.name.startswith("airlock.")]
                parts, names = (found[0], [found[0][2]]) if found and len(found[0]) > 2 else ([], [])
            else:
                continue
            if len(parts) > 1 and parts[1] in PACKAGES and parts[1] != own:
                for name in names:
                    yield module, parts[1], name


# What each package offers the others. A change here is a change of a package's public API: make it on
# purpose, in the package's __init__ and here together.
PINNED: dict[str, list[str]] = {
    "access": [
        "acceptance",
        "audit",
        "cache",
        "cli",
        "events",
        "metrics",
        "middleware",
        "models",
        "quotas",
        "retention",
        "roles",
        "routes",
        "schemas",
        "seal",
        "sealing",
        "service",
        "terms",
    ],
    "backends": ["base", "local", "noise", "pool", "protocol", "registry", "tokenization", "watermark", "weights"],
    "cluster": ["executor", "placement", "worker"],
    "evals": [
        "attestation",
        "client",
        "elicitation",
        "events",
        "models",
        "reporting",
        "routes",
        "schemas",
        "service",
        "terms",
    ],
    "finetune": ["adapters", "events", "jobs", "models", "noise", "routes", "service", "terms"],
    "governance": [
        "GateBlockedError",
        "OverrideRequest",
        "Policy",
        "Promotion",
        "calls",
        "cli",
        "evaluate_gate",
        "load_policy",
        "models",
        "parse_policy",
        "promote",
        "routes",
        "service",
        "trend",
    ],
    "interp": ["cli", "client", "jobs", "models", "nnsight", "routes", "service", "terms"],
    "jobs": ["executor", "models", "periodic", "runner", "service"],
    "leak": ["cli", "keys", "trace"],
    "ledger": [
        "Checkpoint",
        "NoteError",
        "ProofError",
        "Report",
        "Verifier",
        "WitnessVerifier",
        "access_table",
        "cli",
        "commitment_of",
        "cosign",
        "leaf_hash",
        "model_report",
        "models",
        "node_hash",
        "reporting",
        "routes",
        "service",
        "verify_bundle",
        "verify_checkpoint",
        "verify_consistency",
        "verify_inclusion",
        "witness",
    ],
    "migrations": ["SchemaState", "alembic_config", "schema_state", "upgrade"],
    "mitigations": [
        "DEFAULT_REFUSAL",
        "Mitigated",
        "MitigatedStream",
        "Mitigation",
        "VariantPipeline",
        "Verdict",
        "build_mitigation",
        "build_pipeline",
        "check_manifest",
        "mitigation_kinds",
        "pipeline",
        "register_mitigation",
    ],
    "publish": ["cli", "commit", "models", "placeholder", "routes", "service", "verify_commitment"],
    "console": ["auth", "models", "routes"],
    "contamination": ["cli", "corpus", "events", "matcher", "models", "routes", "scheme", "schemas", "service"],
    "redteam": ["cli", "events", "models", "routes", "schemas", "service", "terms"],
    "registry": ["events", "models", "routes", "schemas", "service", "weights"],
    "sandbox": [
        "DENY_SYSCALLS",
        "SANDBOX_UID",
        "SANDBOX_USER",
        "BwrapCommand",
        "BwrapSandbox",
        "MiB",
        "Mount",
        "ResourceLimits",
        "SandboxError",
        "SandboxPolicy",
        "SandboxResult",
        "Termination",
        "bwrap_version",
        "cgroup_parent",
        "ensure_regular",
        "find_bwrap",
        "remove_tree",
        "safe_open_beneath",
        "seccomp_filter",
    ],
    "serving": ["pipelines", "responses", "routes", "service"],
    "web": ["errors", "health", "openapi", "routing", "server", "uploads"],
}


def test_every_package_declares_its_api_and_the_declarations_are_pinned() -> None:
    assert {p: sorted(declared(p)) for p in PACKAGES} == {p: sorted(names) for p, names in PINNED.items()}


@pytest.mark.parametrize("package", PACKAGES)
def test_every_declared_name_exists(package: str) -> None:
    init = (SRC / package / "__init__.py").read_text()
    bound = {
        alias.asname or alias.name
        for node in ast.walk(ast.parse(init))
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    } | {n.name for n in ast.parse(init).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    missing = [
        n
        for n in declared(package)
        if n not in bound and not (SRC / package / f"{n}.py").is_file() and not (SRC / package / n).is_dir()
    ]
    assert missing == []


def test_no_package_reaches_past_another_ones_api() -> None:
    reaches = sorted(
        f"{module} imports airlock.{package}.{name}"
        for module, package, name in imports_across_packages()
        if name not in declared(package)
    )
    assert reaches == []
