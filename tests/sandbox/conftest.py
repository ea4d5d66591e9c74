"""Fixtures and helpers shared by the sandbox tests: a host work dir the sandbox may use, quick sandboxes."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock.sandbox import BwrapSandbox, ResourceLimits, SandboxPolicy, remove_tree


def sandbox(**limits: object) -> BwrapSandbox:
    """A sandbox with the default policy but for the given resource limits."""
    return BwrapSandbox(SandboxPolicy(limits=ResourceLimits(**limits)))  # type: ignore[arg-type]


def py(code: str) -> list[str]:
    """The command running ``code`` (dedented) with the sandbox's system python3."""
    return ["python3", "-c", textwrap.dedent(code)]


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Not pytest's tmp_path: that lives under a 0700 directory the sandbox's host uid cannot enter.
    sb = BwrapSandbox()
    path = sb.make_workdir(prefix="airlock-test-")
    yield path
    remove_tree(path)


@pytest.fixture(autouse=True, scope="module")
def _no_warm_interp_runners() -> None:
    """End the warm interp runners earlier tests left waiting in this process: these tests count what runs."""
    from airlock.interp.pool import close_shared_pools

    close_shared_pools()
