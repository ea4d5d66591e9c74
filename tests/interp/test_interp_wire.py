"""The runner ↔ host wire format: round trips, and refusal of anything but plain data."""

from __future__ import annotations

import socket
import struct

import numpy as np
import pytest

from airlock.interp import _wire


def test_round_trip_of_nested_values_and_arrays() -> None:
    message = {
        "op": "trace",
        "values": [1, 2.5, None, True, "é"],
        "nested": {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": [np.ones(3, np.float16)]},
        "scalar": np.float32(1.5),
    }
    frame = _wire.encode(message)
    header_len, body_len = struct.unpack(">QQ", frame[:16])
    back = _wire.decode(frame[16 : 16 + header_len], frame[16 + header_len :])
    assert body_len == 6 * 8 + 3 * 2
    assert back["values"] == [1, 2.5, None, True, "é"] and back["scalar"] == 1.5
    assert np.array_equal(back["nested"]["a"], message["nested"]["a"]) and back["nested"]["b"][0].dtype == np.float16


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (np.array([object()], dtype=object), "dtype object"),
        ({1: "x"}, "keys must be strings"),
        ({"__nd__": 0}, "reserved"),
        (lambda: None, "function"),
        (b"raw", "bytes"),
    ],
)
def test_only_plain_data_can_be_sent(value: object, match: str) -> None:
    with pytest.raises(_wire.WireError, match=match):
        _wire.encode({"x": value})


@pytest.mark.parametrize(
    ("header", "blob", "match"),
    [
        (b"not json", b"", "malformed"),
        (b'{"body": {}, "arrays": [{"dtype": "object", "shape": [1]}]}', b"x" * 8, "not allowed"),
        (b'{"body": {}, "arrays": [{"dtype": "float32", "shape": [4]}]}', b"x" * 8, "runs past"),
        (b'{"body": {}, "arrays": []}', b"x", "trailing"),
        (b'{"body": {"a": {"__nd__": 3}}, "arrays": []}', b"", "out of range"),
        (b'{"body": {}, "arrays": [{"dtype": "float32", "shape": [-1]}]}', b"", "shape"),
    ],
)
def test_malformed_frames_are_refused(header: bytes, blob: bytes, match: str) -> None:
    with pytest.raises(_wire.WireError, match=match):
        _wire.decode(header, blob)


def test_socket_caps_and_early_close() -> None:
    left, right = socket.socketpair()
    with left, right:
        sent = _wire.send(left, {"op": "x", "a": np.zeros(1000, np.float32)})
        message, size = _wire.recv(right, 1 << 20)
        assert size == sent and message["a"].shape == (1000,)
        _wire.send(left, {"a": np.zeros(1000, np.float32)})
        with pytest.raises(_wire.FrameTooLarge, match="exceeds the cap of 100 bytes"):
            _wire.recv(right, 100)
    a, b = socket.socketpair()
    with b:
        a.sendall(struct.pack(">QQ", 10, 0) + b"{")
        a.close()
        with pytest.raises(_wire.WireError, match="closed in the middle"):
            _wire.recv(b, 1 << 20)


def test_client_exports_exactly_its_public_names() -> None:
    import inspect

    from airlock.interp import client

    public = {
        name
        for name, value in vars(client).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and getattr(value, "__module__", "") == client.__name__
    }
    assert set(client.__all__) == public
