"""The runner ↔ host wire format: length-prefixed frames of a JSON header plus raw numpy arrays.

Both sides of the sandbox import this module, so it needs only the standard library and numpy
(the runner is lean). A frame is ``>QQ`` (header length, body length), a UTF-8 JSON header and
a body of concatenated C-order array bytes. Arrays inside the message are replaced by
``{"__nd__": index}`` and described in the header's ``"arrays"`` list. No pickle, ever: a
decoder only accepts plain numeric dtypes, so a frame can carry data and nothing executable.
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
    "FrameTooLarge",
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


class WireError(Exception):
    """A frame that is malformed, uses a forbidden type, or ends early."""


class FrameTooLarge(WireError):
    """A frame whose declared size exceeds the receiver's cap (nothing of it is read)."""

    def __init__(self, size: int, cap: int) -> None:
        super().__init__(f"a message of {size} bytes exceeds the cap of {cap} bytes")
        self.size = size
        self.cap = cap


def _strip(value: Any, arrays: list[np.ndarray[Any, Any]], depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        raise WireError(f"message nested deeper than {_MAX_DEPTH} levels")
    if isinstance(value, np.ndarray):
        if value.dtype.name not in ALLOWED_DTYPES:
            raise WireError(f"arrays of dtype {value.dtype.name} cannot be sent (use a numeric dtype)")
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
            if not isinstance(index, int) or not 0 <= index < len(arrays):
                raise WireError(f"array reference {index!r} out of range")
            return arrays[index]
        return {key: _restore(item, arrays, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [_restore(item, arrays, depth + 1) for item in value]
    return value


def decode(header: bytes, blob: bytes) -> dict[str, Any]:
    """Rebuild a message from a frame's header and body (arrays are read-only views of ``blob``)."""
    try:
        doc = json.loads(header)
    except ValueError as exc:
        raise WireError(f"malformed message header: {exc}") from None
    except RecursionError:
        raise WireError(f"message nested deeper than {_MAX_DEPTH} levels") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("arrays"), list) or not isinstance(doc.get("body"), dict):
        raise WireError("malformed message header")
    arrays: list[np.ndarray[Any, Any]] = []
    offset = 0
    for spec in doc["arrays"]:
        if not isinstance(spec, dict) or spec.get("dtype") not in ALLOWED_DTYPES:
            raise WireError(f"array dtype {spec.get('dtype') if isinstance(spec, dict) else spec!r} is not allowed")
        shape = spec.get("shape")
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise WireError(f"malformed array shape {shape!r}")
        dtype = np.dtype(spec["dtype"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset + nbytes > len(blob):
            raise WireError("array data runs past the end of the message")
        arrays.append(np.frombuffer(blob, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset).reshape(shape))
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
            raise WireError("connection closed in the middle of a message" if got else "connection closed")
        got += n
    return bytes(buffer)


def send(sock: socket.socket, message: dict[str, Any]) -> int:
    """Send one message; return the frame's size in bytes."""
    frame = encode(message)
    sock.sendall(frame)
    return len(frame)


def recv(sock: socket.socket, max_bytes: int) -> tuple[dict[str, Any], int]:
    """Receive one message of at most ``max_bytes`` (else :class:`FrameTooLarge`); return it and its size."""
    header_len, body_len = _PREFIX.unpack(_read_exactly(sock, _PREFIX.size))
    total = _PREFIX.size + header_len + body_len
    if header_len > _MAX_HEADER or total > max_bytes:
        raise FrameTooLarge(total, max_bytes)
    header = _read_exactly(sock, header_len)
    blob = _read_exactly(sock, body_len) if body_len else b""
    return decode(header, blob), total
