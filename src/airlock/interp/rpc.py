"""The RPC server: the host's end of the one socket a sandboxed runner has, answered on its own thread.

The runner may ask for its job (``job``), report its result or its code's exception (``result``,
``error``) and call the allow-listed verbs ``modules``, ``trace`` and ``generate``
(:mod:`airlock.interp.tracing`), which run on the model's thread within the job's host time
and wall clock (:mod:`airlock.interp.deadline`). Anything else is refused, and a refusal fails
the job even if the evaluator's code catches it. The server is a plain thread blocking on the
socket, so a slow forward pass never blocks an event loop; it trusts nothing in a frame
(:mod:`airlock.interp._wire`) and records what went wrong for the job's diagnosis.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from airlock.errors import AirlockError
from airlock.interp import _wire, deadline
from airlock.interp.errors import PatchRefused, RequestError
from airlock.interp.tracing import (
    DEFAULT_PATCH_NORM_RATIO,
    SYSTEM_KEY,
    ServeBudget,
    describe,
    run_generate,
    run_trace,
)
from airlock.interp.workers import ModelWorker
from airlock.sandbox import MiB

log = logging.getLogger(__name__)

RPC_VERBS = frozenset({"modules", "trace", "generate"})
# Malformed frames answered before the conversation is ended (each one already fails the job).
MAX_PROTOCOL_ERRORS = 8


@dataclass
class RpcStats:
    """What the runner asked of the host."""

    calls: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    model_seconds: float = 0.0
    """Time the model thread spent on this job's calls (forward passes), counted as they run."""
    rpc_seconds: float = 0.0
    """CPU time of the RPC thread (decoding requests, encoding replies): host time too."""
    refused: list[str] = field(default_factory=list)
    protocol_errors: list[str] = field(default_factory=list)
    job_sent_at: float | None = None
    """When (``time.monotonic()``) the job was handed to the runner that asked for it: the runner was ready."""

    @property
    def host_seconds(self) -> float:
        """Return the host time this job used outside its sandbox (model and RPC threads)."""
        return self.model_seconds + self.rpc_seconds

    def as_dict(self) -> dict[str, Any]:
        """Return the stats as JSON values."""
        return {
            "calls": dict(self.calls),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "model_seconds": round(self.model_seconds, 4),
            "rpc_seconds": round(self.rpc_seconds, 4),
            "refused": list(self.refused),
            "protocol_errors": list(self.protocol_errors),
        }


class RpcServer:
    """Answers one runner over the host end of its socketpair, on its own thread."""

    def __init__(
        self,
        sock: socket.socket,
        worker: ModelWorker,
        job: dict[str, Any],
        *,
        max_request_bytes: int = 64 * MiB,
        max_reply_bytes: int = 256 * MiB,
        max_total_bytes: int = 4096 * MiB,
        max_result_bytes: int = 64 * MiB,
        max_model_seconds: float | None = None,
        wall_deadline: float | None = None,
        system_prompt: str | None = None,
        max_patch_ratio: float = DEFAULT_PATCH_NORM_RATIO,
        serve: ServeBudget | None = None,
    ) -> None:
        self.sock = sock
        self.max_patch_ratio = max_patch_ratio
        # Logits mode, per-call estimates and the grant's serving budget (see ServeBudget).
        self.serve = serve if serve is not None else ServeBudget(max_reply_bytes=max_reply_bytes)
        self.system_prompt = system_prompt
        self.worker = worker
        self.job = job
        self.max_request_bytes = max_request_bytes
        self.max_reply_bytes = max_reply_bytes
        self.max_total_bytes = max_total_bytes
        self.max_result_bytes = max_result_bytes
        # The host's forward passes are not in the sandbox's CPU limit; this caps them per job,
        # counted as they run (see airlock.interp.deadline), together with the RPC thread's CPU.
        self.max_model_seconds = max_model_seconds
        self.wall_deadline = wall_deadline
        """``time.monotonic()`` at which the job's wall clock ends: no model call runs past it."""
        self.stats = RpcStats()
        self.result: Any = None
        self.has_result = False
        self.error: dict[str, str] | None = None
        self.protocol_error: str | None = None
        self.result_too_large: int | None = None
        self.host_time_spent: tuple[str, str] | None = None
        """Why the job's host time ran out (message, job error code)."""
        self.host_failure: str | None = None
        """An unexpected failure of the host while handling a message (answered, then the job fails)."""
        self.patch_refused: PatchRefused | None = None
        self.reply_error: tuple[str, str] | None = None
        """Why the host could not send a reply, and the job error code it becomes."""
        self._thread = threading.Thread(target=self._serve, name="airlock-interp-rpc", daemon=True)

    def start(self) -> None:
        """Start serving."""
        self._thread.start()

    def join(self, timeout: float = 30.0) -> None:
        """Wait for the runner's end of the socket to close."""
        self._thread.join(timeout)

    def _serve(self) -> None:
        cpu_at_start = time.thread_time()
        try:
            while self._serve_one():
                self.stats.rpc_seconds = time.thread_time() - cpu_at_start
                if self.max_model_seconds is not None and self.stats.rpc_seconds > self.max_model_seconds:
                    # Only a flood of frames costs this much: stop reading them.
                    self.host_time_spent = (
                        f"the job's messages took more than its host time of {self.max_model_seconds:g} s to decode",
                        "host_time_limit",
                    )
                    return
        except OSError as exc:
            if self.protocol_error is None and not self.has_result:
                self.protocol_error = f"the runner's socket failed: {exc}"
        finally:
            self.stats.rpc_seconds = time.thread_time() - cpu_at_start
            # Whatever ended the conversation, the runner must not block writing to nobody.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def _serve_one(self) -> bool:
        """Receive and answer one message; return False when the conversation is over.

        Nothing a frame holds may end this thread by an exception: a complete frame that is not
        a valid message is answered with a ``protocol_error`` reply (the stream is still in step),
        and only a frame that cannot be read whole (too large, cut short) ends the conversation.
        """
        try:
            # One cap for every frame: a result frame cannot be told apart before it is read.
            message, size = _wire.recv(self.sock, min(self.max_request_bytes, self.max_result_bytes + MiB))
        except _wire.ConnectionClosed:
            return False
        except _wire.FrameTooLarge as exc:
            if exc.op == "result":
                self.result_too_large = exc.size
                what = f"the result is {exc.size} bytes (cap {exc.cap})"
            else:
                verb = f"a {exc.op!r} message" if exc.op else "a message"
                what = f"the runner sent {verb} of {exc.size} bytes (cap {exc.cap})"
                self._protocol_violation(what)
            self._send_error("protocol_error", what + "; the conversation is over")
            return False
        except _wire.MalformedFrame as exc:
            self.stats.bytes_in += exc.size
            return self._protocol_violation(f"malformed message from the runner: {exc}", answer=True)
        except _wire.WireError as exc:  # cut short: the stream is out of step
            self._protocol_violation(f"malformed message from the runner: {exc}")
            return False
        self.stats.bytes_in += size
        try:
            return self._dispatch(message)
        except OSError:
            raise
        except _wire.WireError as exc:
            # Only the host's own replies get here (what the runner sends is checked in recv).
            self.reply_error = (f"the host could not send a reply to the runner: {exc}", "reply_error")
            return False
        except Exception as exc:  # a host bug must not take the RPC thread (and with it the job) down silently
            log.exception("interp RPC: the host failed to handle a message")
            self.host_failure = self.host_failure or f"{type(exc).__name__}: {str(exc)[:200]}"
            self._send_error("host_error", f"the host failed to handle the message ({type(exc).__name__})")
            return True

    def _dispatch(self, message: dict[str, Any]) -> bool:
        op = message.get("op")
        if not isinstance(op, str):
            self._refuse("a message without a verb")
            return True
        self.stats.calls[op[:64]] = self.stats.calls.get(op[:64], 0) + 1
        if op == "job":
            if self.stats.job_sent_at is None:
                self.stats.job_sent_at = time.monotonic()
            try:
                self._reply(self.job)
            except _wire.WireError as exc:
                self.reply_error = (f"the job's arguments could not be sent to the runner: {exc}", "invalid_args")
                return False
        elif op == "result":
            self.result, self.has_result = message.get("value"), True
            self._reply({"ok": True})
        elif op == "error":
            self.error = {
                "type": str(message.get("type", "Error"))[:200],
                "message": str(message.get("message", ""))[:4000],
            }
        elif op in RPC_VERBS:
            self._answer(op, message)
        else:
            self._refuse(f"the RPC verb {op[:64]!r} (allowed: {', '.join(sorted(RPC_VERBS))})")
        return True

    def _protocol_violation(self, what: str, *, answer: bool = False) -> bool:
        """Record a broken frame (it fails the job); answer it when ``answer``; return whether to go on."""
        self.protocol_error = self.protocol_error or what
        self.stats.protocol_errors.append(what[:300])
        if answer:
            self._send_error("protocol_error", what)
        # A runner that keeps sending garbage is not trying to be understood.
        return len(self.stats.protocol_errors) < MAX_PROTOCOL_ERRORS

    def _send_error(self, code: str, message: str) -> None:
        """Best-effort error reply (the runner may already be gone, or not reading)."""
        with contextlib.suppress(OSError, _wire.WireError):
            self._reply({"ok": False, "code": code, "error": message})

    def _call_deadline(self, started: float) -> deadline.Deadline:
        """Return when a model call starting at ``started`` must stop: host time left, or the wall clock."""
        at, code = math.inf, "host_time_limit"
        message = "the call ran out of time"
        if self.max_model_seconds is not None:
            at = started + self.max_model_seconds - self.stats.host_seconds
            message = (
                f"the job's host model time of {self.max_model_seconds:g} s ran out during this call "
                "(forward passes on the lab's side count as they run)"
            )
        if self.wall_deadline is not None and self.wall_deadline < at:
            at, code = self.wall_deadline, "timeout"
            message = "the job's wall-clock limit was reached during this call"
        return deadline.Deadline(at=at, message=message, code=code)

    def _refuse(self, what: str) -> None:
        self.stats.refused.append(what)
        self._reply({"ok": False, "error": f"refused {what}"})

    def _reply(self, message: dict[str, Any]) -> None:
        """Send ``message`` (a :class:`~airlock.interp._wire.WireError` if it cannot be encoded)."""
        self.stats.bytes_out += _wire.send(self.sock, message)

    def _answer(self, op: str, request: dict[str, Any]) -> None:
        if self.stats.bytes_out > self.max_total_bytes:
            self._reply(
                {"ok": False, "error": f"the job's RPC transfer budget of {self.max_total_bytes} bytes is spent"}
            )
            return
        if self.max_model_seconds is not None and self.stats.host_seconds >= self.max_model_seconds:
            spent = (f"the job's host model time of {self.max_model_seconds:g} s is spent", "host_time_limit")
            self.host_time_spent = self.host_time_spent or spent
            self._reply({"ok": False, "code": spent[1], "error": spent[0]})
            return
        request = {k: v for k, v in request.items() if k != SYSTEM_KEY}
        if self.system_prompt:
            request[SYSTEM_KEY] = self.system_prompt
        handlers: dict[str, Callable[[Any, Any], dict[str, Any]]] = {
            "modules": lambda m, t: describe(m),
            "trace": lambda m, t: run_trace(m, t, request, self.max_patch_ratio, self.serve),
            "generate": lambda m, t: run_generate(m, t, request, self.max_patch_ratio, self.serve),
        }
        handler = handlers[op]

        def timed(model: Any, tokenizer: Any) -> dict[str, Any]:
            # On the model thread: the clock starts when the call does (not while it waits for
            # serving's batching step), and the hooks live only as long as the call.
            started = time.monotonic()
            try:
                with deadline.enforced(model, self._call_deadline(started)):
                    return handler(model, tokenizer)
            finally:
                self.stats.model_seconds += time.monotonic() - started

        try:
            body = self.worker.submit(timed).result()
            reply = {"ok": True, **body}
            frame = _wire.encode(reply)
        except deadline.DeadlineExceeded as exc:
            # Like a refused patch: the job fails even if the evaluator's code catches the error.
            self.host_time_spent = self.host_time_spent or (str(exc), exc.code)
            self._reply({"ok": False, "code": exc.code, "error": str(exc)})
            return
        except PatchRefused as exc:
            # Like a forbidden verb: the job fails even if the evaluator's code catches the error.
            self.patch_refused = self.patch_refused or exc
            self._reply({"ok": False, "error": str(exc)})
            return
        except RequestError as exc:
            self._reply({"ok": False, "error": str(exc)})
            return
        except AirlockError as exc:
            self._reply({"ok": False, "error": exc.message})
            return
        except Exception as exc:  # a model failure must reach the evaluator as an error, not a hang
            log.exception("interp %s failed", op)
            self._reply({"ok": False, "error": f"the host could not run {op}: {type(exc).__name__}"})
            return
        if len(frame) > self.max_reply_bytes:
            self._reply({"ok": False, "error": f"the reply would be {len(frame)} bytes (cap {self.max_reply_bytes})"})
            return
        self.sock.sendall(frame)
        self.stats.bytes_out += len(frame)
