"""The web console under ``/ui``: server-rendered pages over the same services and authorization as the API.

An interface, like the routes and the CLI: sign-in exchanges an evaluator key or a lab token for a
short-lived session cookie that is re-checked against its credential on every request (revoking
the key or token ends the session at once); every form carries a CSRF token; every page is served
with a strict Content-Security-Policy and its assets ship in the package.
"""

__all__ = ["auth", "models", "routes"]
