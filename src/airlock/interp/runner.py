"""The sandboxed runner's bootstrap: fetch the job over the inherited socket, run it, send the result.

Runs inside bubblewrap with a lean interpreter (standard library, numpy, and scikit-learn when
the host has it); it must not import anything else of Airlock. The evaluator's code is a
Python source file whose entry point is called with the job's arguments as keyword arguments;
it talks to the model only through :mod:`airlock.interp.client`, and whatever it returns
(JSON values and numpy arrays) becomes the job's result, subject to the host's output policy.
"""

from __future__ import annotations

import contextlib
import linecache
import os
import socket
import sys
import traceback
import types
from typing import Any

from airlock.interp import _wire

FD_ENV = "AIRLOCK_INTERP_FD"
# Exit statuses the host maps to job errors (anything else is a crash of the runner).
EXIT_OK = 0
EXIT_USER_ERROR = 3
EXIT_PROTOCOL_ERROR = 4
_MAX_JOB_MESSAGE = 4 * 1024 * 1024


def connect() -> socket.socket:
    """Return the socket inherited from the host (its number is in ``AIRLOCK_INTERP_FD``)."""
    raw = os.environ.get(FD_ENV)
    if raw is None or not raw.isdigit():
        raise RuntimeError(f"{FD_ENV} is not set: this code runs only inside an Airlock interp job")
    return socket.socket(fileno=int(raw))


def _load(code: str, filename: str) -> types.ModuleType:
    module = types.ModuleType("evaluator_job")
    module.__file__ = filename
    # Tracebacks show the evaluator's own lines although the file only exists in memory.
    linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
    sys.modules["evaluator_job"] = module
    exec(compile(code, filename, "exec"), module.__dict__)
    return module


def main() -> int:
    """Run the job this sandbox was started for; return the process exit status."""
    sock = connect()
    # The client is imported once the socket is connected: it attaches to that socket on first use.
    from airlock.interp import client

    client._attach(sock)
    try:
        _wire.send(sock, {"op": "job"})
        job, _size = _wire.recv(sock, _MAX_JOB_MESSAGE)
        code, filename, entry = str(job["code"]), str(job["filename"]), str(job["entry_point"])
        args: dict[str, Any] = dict(job.get("args") or {})
    except (OSError, _wire.WireError, KeyError, TypeError) as exc:
        print(f"airlock runner: cannot fetch the job from the host: {exc}", file=sys.stderr)
        return EXIT_PROTOCOL_ERROR
    try:
        module = _load(code, filename)
        function = getattr(module, entry, None)
        if not callable(function):
            raise AttributeError(f"the code defines no callable entry point {entry!r}")
        value = function(**args)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise TypeError(
                f"the entry point must return a dict (JSON values and numpy arrays), not {type(value).__name__}"
            )
        shim = sys.modules.get("airlock.interp.nnsight")
        if shim is not None:  # nnsight-style code may return its saved proxies as they are
            value = shim.plain(value)
        frame = _wire.encode({"op": "result", "value": value})
    except client.RemoteError as exc:
        # The host refused a call: its message says why, the evaluator's traceback says where.
        traceback.print_exc()
        return _report(sock, "rpc_refused", str(exc))
    except BaseException as exc:
        traceback.print_exc()
        return _report(sock, type(exc).__name__, str(exc) or type(exc).__name__)
    try:
        sock.sendall(frame)
        ack, _size = _wire.recv(sock, 64 * 1024)  # the host's acknowledgement: the result is in
    except (OSError, _wire.WireError) as exc:
        print(f"airlock runner: the host did not take the result: {exc}", file=sys.stderr)
        return EXIT_PROTOCOL_ERROR
    if ack.get("ok") is not True:
        print(f"airlock runner: the host refused the result: {ack.get('error')}", file=sys.stderr)
        return EXIT_PROTOCOL_ERROR
    return EXIT_OK


def _report(sock: socket.socket, kind: str, message: str) -> int:
    with contextlib.suppress(OSError, _wire.WireError):  # the exit status still tells the host
        _wire.send(sock, {"op": "error", "type": kind, "message": message[:2000]})
    return EXIT_USER_ERROR
