"""Signing in to the console over plain HTTP, and reading a page's CSRF token."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from tests.conftest import Lab


def csrf_of(page: str) -> str:
    """Return the first CSRF token a page's forms carry."""
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


@contextmanager
def signed_in(lab: Lab, secret: str) -> Iterator[httpx.Client]:
    """Yield a client signed in to the console with an evaluator key or a lab token."""
    client = httpx.Client(base_url=lab.url, timeout=30)
    token = csrf_of(client.get("/ui/sign-in").text)
    signed = client.post("/ui/sign-in", data={"credential": secret, "csrf_token": token})
    assert signed.status_code == 303, signed.text
    try:
        yield client
    finally:
        client.close()
