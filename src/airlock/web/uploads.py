"""Reading multipart uploads with a size cap, shared by the routes that accept files."""

from __future__ import annotations

from fastapi import UploadFile

from airlock.errors import InvalidRequestError

_CHUNK = 256 * 1024


async def read_upload(upload: UploadFile, limit: int, *, what: str = "file") -> bytes:
    """Return the upload's bytes, or a 400 ``file_too_large`` once it passes ``limit`` bytes."""
    # Read at most limit + one chunk so an oversized upload never sits in memory whole.
    chunks: list[bytes] = []
    size = 0
    while chunk := await upload.read(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise InvalidRequestError(f"{what} is over the limit of {limit} bytes", code="file_too_large", param="file")
        chunks.append(chunk)
    return b"".join(chunks)
