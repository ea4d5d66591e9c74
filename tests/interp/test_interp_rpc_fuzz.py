"""The host's RPC server against random and adversarial frames: each is answered with ``protocol_error``.

No frame may end the RPC thread with an exception; a frame read whole leaves the stream in step.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airlock.interp import _wire
from airlock.interp.rpc import MAX_PROTOCOL_ERRORS, RpcServer
from airlock.interp.workers import ThreadWorker

PREFIX = struct.Struct(">QQ")
# Bounded: a few seconds for the whole module.
FUZZ = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


class _NoModel:
    """A worker that must never be reached by a frame that is not a valid message."""

    def submit(self, fn: Any) -> Any:
        raise AssertionError("a malformed frame reached the model")


@pytest.fixture
def thread_deaths() -> Iterator[list[BaseException]]:
    """Exceptions that ended any thread while the test ran (there must be none)."""
    deaths: list[BaseException] = []
    previous = threading.excepthook

    def record(args: threading.ExceptHookArgs) -> None:
        deaths.append(args.exc_value if args.exc_value is not None else RuntimeError(str(args.exc_type)))

    threading.excepthook = record
    yield deaths
    threading.excepthook = previous
    assert deaths == []


class _Conversation:
    """One RpcServer on a socketpair, as a runner would see it."""

    def __init__(self, worker: Any = None, **limits: Any) -> None:
        self.host_end, self.runner = socket.socketpair()
        self.runner.settimeout(10)
        self.server = RpcServer(self.host_end, worker or _NoModel(), {"ok": True, "code": "x"}, **limits)
        self.server.start()

    def frame(self, header: bytes, blob: bytes = b"") -> dict[str, Any]:
        self.runner.sendall(PREFIX.pack(len(header), len(blob)) + header + blob)
        reply, _size = _wire.recv(self.runner, 1 << 20)
        return reply

    def still_in_step(self) -> None:
        _wire.send(self.runner, {"op": "job"})
        reply, _size = _wire.recv(self.runner, 1 << 20)
        assert reply == {"ok": True, "code": "x"}
        assert self.server._thread.is_alive()

    def close(self) -> None:
        self.runner.close()
        self.server.join(10)
        assert not self.server._thread.is_alive()
        self.host_end.close()


def _header(body: Any, arrays: Any) -> bytes:
    return json.dumps({"body": body, "arrays": arrays}).encode()


def _refused(reply: dict[str, Any]) -> None:
    assert reply["ok"] is False and reply["code"] == "protocol_error", reply
    assert reply["error"].startswith("malformed message from the runner")


# ------------------------------------------------------------------------------ adversarial frames

ADVERSARIAL = [
    pytest.param(
        _header({"op": "trace", "a": {"__nd__": 0}}, [{"dtype": "float32", "shape": [2**32, 2**32]}]),
        b"",
        id="2^32x2^32",
    ),
    pytest.param(
        _header({"a": {"__nd__": 0}}, [{"dtype": "float32", "shape": [2**62, 4]}]), b"x" * 16, id="wraps-int64"
    ),
    pytest.param(_header({}, [{"dtype": "float32", "shape": [-1]}]), b"", id="negative-dim"),
    pytest.param(
        _header({}, [{"dtype": "float32", "shape": [-(2**40), -(2**40)]}]), b"", id="negatives-whose-product-fits"
    ),
    pytest.param(_header({}, [{"dtype": "float32", "shape": [10**5000 // 10**4990]}]), b"", id="huge-dim"),
    pytest.param(_header({}, [{"dtype": "int8", "shape": [0, 2**31, 2**31, 2**31]}]), b"", id="empty-but-absurd"),
    pytest.param(_header({}, [{"dtype": "float32", "shape": [True, 4]}]), b"x" * 16, id="bool-dim"),
    pytest.param(_header({}, [{"dtype": "float32", "shape": [1.5]}]), b"x" * 8, id="float-dim"),
    pytest.param(_header({}, [{"dtype": "float32", "shape": "4"}]), b"x" * 16, id="string-shape"),
    pytest.param(_header({}, [{"dtype": "float32", "shape": [1] * 65}]), b"x" * 4, id="65-dims"),
    pytest.param(_header({}, [{"dtype": "object", "shape": [1]}]), b"x" * 8, id="object-dtype"),
    pytest.param(_header({}, [{"dtype": ["float32"], "shape": [1]}]), b"x" * 4, id="unhashable-dtype"),
    pytest.param(_header({}, [{"dtype": "V8", "shape": [1]}]), b"x" * 8, id="void-dtype"),
    pytest.param(_header({}, [{"dtype": ">f4", "shape": [1]}]), b"x" * 4, id="byte-order-dtype"),
    pytest.param(_header({}, [{"dtype": "float32", "shape": [4]}]), b"x" * 8, id="truncated-payload"),
    pytest.param(_header({}, [{"dtype": "float32", "shape": [1]}]), b"x" * 8, id="trailing-payload"),
    pytest.param(_header({}, ["float32"]), b"", id="array-spec-not-a-dict"),
    pytest.param(_header({"a": {"__nd__": 5}}, []), b"", id="dangling-reference"),
    pytest.param(_header({"a": {"__nd__": True}}, [{"dtype": "uint8", "shape": [1]}]), b"x", id="bool-reference"),
    pytest.param(_header({"a": {"__nd__": -1}}, [{"dtype": "uint8", "shape": [1]}]), b"x", id="negative-reference"),
    pytest.param(_header([], []), b"", id="body-a-list"),
    pytest.param(_header("op", []), b"", id="body-a-string"),
    pytest.param(json.dumps([1, 2]).encode(), b"", id="header-a-list"),
    pytest.param(json.dumps({"body": {}}).encode(), b"", id="no-arrays"),
    pytest.param(json.dumps({"body": {}, "arrays": {}}).encode(), b"", id="arrays-a-dict"),
    pytest.param(b'{"body": {"op": "job", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b'}, "arrays": []}', b"", id="deep"),
    pytest.param(b'{"body": {"op": "job", "x": 1' + b"0" * 5000 + b'}, "arrays": []}', b"", id="5000-digit-int"),
    pytest.param(b"\xff\xfe\x00garbage", b"", id="not-utf8"),
    pytest.param(b"", b"", id="empty-header"),
    pytest.param(_header({}, [{"dtype": "float32", "shape": [1]}] * 70_000), b"", id="too-many-arrays"),
]


@pytest.mark.parametrize(("header", "blob"), ADVERSARIAL)
def test_adversarial_frames_are_answered_with_protocol_error(
    thread_deaths: list[BaseException], header: bytes, blob: bytes
) -> None:
    talk = _Conversation()
    _refused(talk.frame(header, blob))
    talk.still_in_step()  # the frame was read whole: the next one is understood
    talk.close()
    assert talk.server.protocol_error is not None  # the job fails as protocol_error even if the code goes on


def test_too_many_broken_frames_end_the_conversation(thread_deaths: list[BaseException]) -> None:
    talk = _Conversation()
    for _ in range(MAX_PROTOCOL_ERRORS):
        _refused(talk.frame(b"nonsense"))
    talk.server.join(10)
    assert not talk.server._thread.is_alive() and len(talk.server.stats.protocol_errors) == MAX_PROTOCOL_ERRORS
    talk.close()


@pytest.mark.parametrize(
    ("prefix", "rest", "expect"),
    [
        pytest.param(PREFIX.pack(2**63, 2**63), b"", "too large", id="declared-2^64"),
        pytest.param(PREFIX.pack(100, 0), b'{"body"', "middle of a message", id="cut-short"),
        pytest.param(b"\x00\x00\x00", b"", None, id="cut-in-prefix"),
        pytest.param(PREFIX.pack(_wire._MAX_HEADER + 1, 0), b"", "too large", id="header-over-its-cap"),
    ],
)
def test_frames_that_cannot_be_read_whole_end_the_job_cleanly(
    thread_deaths: list[BaseException], prefix: bytes, rest: bytes, expect: str | None
) -> None:
    talk = _Conversation()
    talk.runner.sendall(prefix + rest)
    talk.runner.shutdown(socket.SHUT_WR)
    talk.server.join(10)
    assert not talk.server._thread.is_alive()
    if expect == "too large":
        reply, _size = _wire.recv(talk.runner, 1 << 20)  # told why before the end
        assert reply["code"] == "protocol_error" and "cap" in reply["error"]
        assert talk.server.protocol_error is not None and "cap" in talk.server.protocol_error
    elif expect is not None:
        assert talk.server.protocol_error is not None and expect in talk.server.protocol_error
    talk.close()


def test_an_oversized_result_is_told_from_an_oversized_request(thread_deaths: list[BaseException]) -> None:
    for op, field in (("result", "result_too_large"), ("trace", "protocol_error")):
        talk = _Conversation(max_result_bytes=1000)  # frames are capped at this + 1 MiB
        frame = _wire.encode({"op": op, "value": np.zeros(1_000_000, np.float32)})
        with pytest.raises((BrokenPipeError, ConnectionResetError)):  # the host stopped reading
            talk.runner.sendall(frame)
        talk.server.join(10)
        assert getattr(talk.server, field) is not None
        if op == "trace":
            assert "a 'trace' message of" in str(talk.server.protocol_error) and talk.server.result_too_large is None
        talk.close()


# ------------------------------------------------------------------------------ random frames

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
_DIM = st.one_of(
    st.integers(0, 8),
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**31, 2**32, 2**63 - 1, 2**63, 2**64, -1]),
    st.booleans(),
    st.floats(allow_nan=False),
    st.text(max_size=3),
)
_DTYPE = st.one_of(
    st.sampled_from(sorted(_wire.ALLOWED_DTYPES)),
    st.sampled_from(["object", "V4", ">f8", "U3", "", "complex64"]),
    _JSON,
)


@st.composite
def _broken_array_frames(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A frame whose one array is described inconsistently with its payload (or not validly at all)."""
    spec: dict[str, Any] = {"dtype": draw(_DTYPE), "shape": draw(st.one_of(st.lists(_DIM, max_size=6), _JSON))}
    blob = draw(st.binary(max_size=64))
    dtype, shape = spec["dtype"], spec["shape"]
    plausible = isinstance(dtype, str) and dtype in _wire.ALLOWED_DTYPES and isinstance(shape, list)
    if plausible and len(shape) <= _wire.MAX_NDIM and all(type(n) is int and 0 <= n < 2**31 for n in shape):
        size = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
        if size == len(blob):
            blob += b"\x00"  # make the payload disagree with the shape
    body = {"op": draw(st.sampled_from(["trace", "job", "result", "generate"])), "a": {"__nd__": 0}}
    return _header(body, [spec]), blob


@FUZZ
@given(frame=_broken_array_frames())
def test_fuzzed_array_descriptions_are_refused(thread_deaths: list[BaseException], frame: tuple[bytes, bytes]) -> None:
    talk = _Conversation()
    try:
        _refused(talk.frame(*frame))
        talk.still_in_step()
    finally:
        talk.close()


@FUZZ
@given(header=st.binary(max_size=200), blob=st.binary(max_size=64))
def test_fuzzed_raw_bytes_are_refused(thread_deaths: list[BaseException], header: bytes, blob: bytes) -> None:
    try:
        _wire.decode(header, blob)
    except _wire.WireError:
        pass
    else:  # random bytes that happen to be a valid message are not this test's business
        return
    talk = _Conversation()
    try:
        _refused(talk.frame(header, blob))
        talk.still_in_step()
    finally:
        talk.close()


@FUZZ
@given(stream=st.binary(min_size=1, max_size=300))
def test_fuzzed_streams_never_kill_the_thread(thread_deaths: list[BaseException], stream: bytes) -> None:
    talk = _Conversation()
    with talk.runner:
        talk.runner.sendall(stream)
        talk.runner.shutdown(socket.SHUT_WR)
        talk.server.join(10)
        assert not talk.server._thread.is_alive()
    talk.host_end.close()
    # Whatever the stream held, the server ended by its own rules and recorded what it saw.
    server = talk.server
    assert server.protocol_error or server.result_too_large or server.stats.calls or server.stats.refused


@settings(FUZZ, max_examples=60)
@given(
    op=st.sampled_from(["trace", "generate", "modules", "job", "error", "result", "other", ""]),
    params=st.dictionaries(
        st.sampled_from(
            [
                "prompts",
                "read",
                "patch",
                "positions",
                "logits",
                "lens",
                "top_k",
                "max_tokens",
                "temperature",
                "seed",
                "chat",
                "type",
                "message",
                "value",
            ]
        ),
        _JSON,
        max_size=5,
    ),
)
def test_fuzzed_valid_frames_are_answered_without_killing_the_thread(
    thread_deaths: list[BaseException], tiny_worker: ThreadWorker, op: str, params: dict[str, Any]
) -> None:
    talk = _Conversation(tiny_worker)
    try:
        _wire.send(talk.runner, {"op": op, **params})
        if op != "error":  # an error report gets no reply
            reply, _size = _wire.recv(talk.runner, 1 << 30)
            assert isinstance(reply.get("ok"), bool)
        talk.still_in_step()
        assert talk.server.host_failure is None and talk.server.protocol_error is None
    finally:
        talk.close()
