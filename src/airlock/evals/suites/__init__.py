"""Built-in proxy suites (safe by construction), each an Inspect task with a versioned dataset hash.

Every suite module defines one ``@task`` function named like the suite, a ``SUITE_VERSION``
string and a ``dataset_hash() -> str`` (SHA-256 of the canonical JSON of its dataset), and puts
``{"suite": name, "suite_version": ..., "dataset_hash": ...}`` into the task's metadata.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from airlock.canonical import sha256_hex

SUITE_MODULES = {
    "knowledge_proxy": "airlock.evals.suites.knowledge_proxy",
    "refusal_robustness": "airlock.evals.suites.refusal_robustness",
    "cyber_ctf_lite": "airlock.evals.suites.cyber_ctf_lite",
    "autonomy_lite": "airlock.evals.suites.autonomy_lite",
}


def canonical_hash(data: Any) -> str:
    """Return the SHA-256 of ``data`` as RFC 8785 canonical JSON."""
    return sha256_hex(data)


def suite_task(name: str) -> Callable[..., Any]:
    """Return the ``@task`` function of the built-in suite ``name``."""
    try:
        module = importlib.import_module(SUITE_MODULES[name])
    except KeyError:
        raise KeyError(f"unknown suite {name!r}; built-in suites: {', '.join(SUITE_MODULES)}") from None
    task_fn: Callable[..., Any] = getattr(module, name)
    return task_fn


def suite_dataset_hash(name: str) -> str:
    """Return the dataset hash of the built-in suite ``name``."""
    module = importlib.import_module(SUITE_MODULES[name])
    digest: str = module.dataset_hash()
    return digest
