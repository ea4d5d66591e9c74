"""The runner ↔ host wire format: length-prefixed frames of a JSON header plus raw numpy arrays.

Both sides of the sandbox import this module, so it needs only the standard library and numpy
(the runner is lean). A frame is ``>QQ`` (header length, body length), a UTF-8 JSON header and
a body of concatenated C-order array bytes. Arrays inside the message are replaced by
``{"__nd__": index}`` and described in the header's ``"arrays"`` list. No pickle, ever: a
decoder only accepts plain numeric dtypes, so a frame can carry data and nothing executable.

A decoder trusts nothing in a frame: every array's shape and dtype are checked with Python
integers (at most :data:`MAX_NDIM` dimensions, each an ``int`` >= 0, and the product of the
dimensions times the item size must be exactly the bytes the frame carries for it) before numpy
sees them. A complete frame that fails a check raises :class:`MalformedFrame`, after which the
stream is still in step; :class:`FrameTooLarge` and a frame cut short leave it out of step.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import numpy as np

__all__ = [
    "ALLOWED_DTYPES",
    "ARRAY_KEY",
    "MAX_DEPTH",
    "MAX_NDIM",
    "ConnectionClosed",
    "FrameTooLarge",
    "MalformedFrame",
    "WireError",
    "decode",
    "encode",
    "nesting_depth",
    "recv",
    "send",
]

ARRAY_KEY = "__nd__"
ALLOWED_DTYPES = frozenset(
    {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "bool"}
)
_PREFIX = struct.Struct(">QQ")
_MAX_HEADER = 8 * 1024 * 1024
_MAX_DEPTH = 32
MAX_DEPTH = _MAX_DEPTH
MAX_NDIM = 32
_MAX_ARRAYS = 65536
# Bound on an array's extent (its dimensions with zeros counted as ones, times the item size):
# a frame's arrays must fit its body, so this only bites on empty arrays with absurd dimensions,
# which numpy itself would refuse with an exception of its own.
_MAX_EXTENT = 1 << 40


class WireError(Exception):
    """A frame that is malformed, uses a forbidden type, or ends early."""


class ConnectionClosed(WireError):
    """The peer closed the connection between two frames (an orderly end)."""


class FrameTooLarge(WireError):
    """A frame whose declared size exceeds the receiver's cap (its body is not read).

    ``op`` is the frame's verb when its header was small enough to read and named one: it tells
    an oversized result from an oversized request.
    """

    def __init__(self, size: int, cap: int, op: str | None = None) -> None:
        super().__init__(f"a message of {size} bytes exceeds the cap of {cap} bytes")
        self.size = size
        self.cap = cap
        self.op = op


class MalformedFrame(WireError):
    """A complete frame (``size`` bytes, all read) that is not a valid message; the stream is still in step."""

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


def _strip(value: Any, arrays: list[np.ndarray[Any, Any]], depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        raise WireError(f"message nested deeper than {_MAX_DEPTH} levels")
    if isinstance(value, np.ndarray):
        if value.dtype.name not in ALLOWED_DTYPES:
            raise WireError(f"arrays of dtype {value.dtype.name} cannot be sent (use a numeric dtype)")
        if value.ndim > MAX_NDIM:
            raise WireError(f"arrays of {value.ndim} dimensions cannot be sent (at most {MAX_NDIM})")
        arrays.append(np.ascontiguousarray(value))
        return {ARRAY_KEY: len(arrays) - 1}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise WireError(f"dictionary keys must be strings, not {type(key).__name__}")
            if key == ARRAY_KEY:
                raise WireError(f"{ARRAY_KEY!r} is a reserved key")
            out[key] = _strip(item, arrays, depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [_strip(item, arrays, depth + 1) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise WireError(f"values of type {type(value).__name__} cannot be sent (JSON values and numpy arrays only)")


def nesting_depth(value: Any) -> int:
    """Return how deep ``value`` nests lists and dicts (a scalar or empty container: 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(node, dict):
            stack.extend((item, depth + 1) for item in node.values())
        elif isinstance(node, list | tuple):
            stack.extend((item, depth + 1) for item in node)
    return deepest


def encode(message: dict[str, Any]) -> bytes:
    """Return one frame for ``message`` (JSON values and numpy arrays, nested freely)."""
    arrays: list[np.ndarray[Any, Any]] = []
    body = _strip(message, arrays)
    specs = [{"dtype": a.dtype.name, "shape": list(a.shape)} for a in arrays]
    header = json.dumps({"body": body, "arrays": specs}, allow_nan=True, separators=(",", ":")).encode()
    blob = b"".join(a.tobytes() for a in arrays)
    return _PREFIX.pack(len(header), len(blob)) + header + blob


def _restore(value: Any, arrays: list[np.ndarray[Any, Any]], depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        raise WireError(f"message nested deeper than {_MAX_DEPTH} levels")
    if isinstance(value, dict):
        if set(value) == {ARRAY_KEY}:
            index = value[ARRAY_KEY]
            if type(index) is not int or not 0 <= index < len(arrays):
                raise WireError(f"array reference {str(index)[:40]!r} out of range")
            return arrays[index]
        return {key: _restore(item, arrays, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [_restore(item, arrays, depth + 1) for item in value]
    return value


def _array_size(spec: Any, left: int) -> tuple[np.dtype[Any], list[int], int]:
    """Check one array description against the ``left`` bytes of body; return its dtype, shape and byte size."""
    if not isinstance(spec, dict):
        raise WireError("malformed array description")
    name = spec.get("dtype")
    if not isinstance(name, str) or name not in ALLOWED_DTYPES:
        raise WireError(f"array dtype {str(name)[:40]!r} is not allowed")
    shape = spec.get("shape")
    # type() rather than isinstance: JSON true/false would otherwise pass as dimensions 1 and 0.
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(type(n) is int and n >= 0 for n in shape):
        raise WireError(f"malformed array shape {str(shape)[:80]}")
    dtype = np.dtype(name)
    # Python integers, never numpy's fixed-width ones: [2**32, 2**32] must not wrap around.
    count, extent = 1, dtype.itemsize
    for n in shape:
        count *= n
        extent *= max(n, 1)
        if extent > _MAX_EXTENT:
            raise WireError(f"array shape {str(shape)[:80]} is too large")
    nbytes = count * dtype.itemsize
    if nbytes > left:
        raise WireError(f"array data runs past the end of the message ({nbytes} bytes declared, {left} left)")
    return dtype, shape, nbytes


def decode(header: bytes, blob: bytes) -> dict[str, Any]:
    """Rebuild a message from a frame's header and body (arrays are read-only views of ``blob``)."""
    try:
        doc = json.loads(header)
    except ValueError as exc:
        raise WireError(f"malformed message header: {str(exc)[:200]}") from None
    except RecursionError:
        raise WireError(f"message nested deeper than {_MAX_DEPTH} levels") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("arrays"), list) or not isinstance(doc.get("body"), dict):
        raise WireError("malformed message header")
    if len(doc["arrays"]) > _MAX_ARRAYS:
        raise WireError(f"a message may carry at most {_MAX_ARRAYS} arrays")
    arrays: list[np.ndarray[Any, Any]] = []
    offset = 0
    for spec in doc["arrays"]:
        dtype, shape, nbytes = _array_size(spec, len(blob) - offset)
        if nbytes:
            array = np.frombuffer(blob, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset).reshape(shape)
        else:
            array = np.zeros(shape, dtype=dtype)
            array.flags.writeable = False
        arrays.append(array)
        offset += nbytes
    if offset != len(blob):
        raise WireError("message has trailing bytes after its arrays")
    restored = _restore(doc["body"], arrays)
    assert isinstance(restored, dict)
    return restored


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            if got:
                raise WireError("connection closed in the middle of a message")
            raise ConnectionClosed("connection closed")
        got += n
    return bytes(buffer)


def send(sock: socket.socket, message: dict[str, Any]) -> int:
    """Send one message; return the frame's size in bytes."""
    frame = encode(message)
    sock.sendall(frame)
    return len(frame)


def _peek_op(header: bytes) -> str | None:
    """Return the verb a header names, if it is readable JSON that names one (for error reports only)."""
    try:
        doc = json.loads(header)
    except (ValueError, RecursionError):
        return None
    body = doc.get("body") if isinstance(doc, dict) else None
    op = body.get("op") if isinstance(body, dict) else None
    return op[:64] if isinstance(op, str) else None


def recv(sock: socket.socket, max_bytes: int) -> tuple[dict[str, Any], int]:
    """Receive one message of at most ``max_bytes`` (else :class:`FrameTooLarge`); return it and its size.

    A frame that is read whole but is not a valid message raises :class:`MalformedFrame`; a
    stream that ends between frames raises :class:`ConnectionClosed`.
    """
    header_len, body_len = _PREFIX.unpack(_read_exactly(sock, _PREFIX.size))
    total = _PREFIX.size + header_len + body_len
    if header_len > _MAX_HEADER or total > max_bytes:
        op = None
        if header_len <= min(_MAX_HEADER, max_bytes):
            # The header alone fits: read it to say what was too large; the body stays unread.
            op = _peek_op(_read_exactly(sock, header_len))
        raise FrameTooLarge(total, max_bytes, op)
    header = _read_exactly(sock, header_len)
    blob = _read_exactly(sock, body_len) if body_len else b""
    try:
        return decode(header, blob), total
    except WireError as exc:
        raise MalformedFrame(str(exc), total) from None
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        # decode checks everything it is given; this only keeps a missed case from escaping as
        # anything but a refusal of the frame.
        raise MalformedFrame(f"malformed message: {type(exc).__name__}", total) from None
