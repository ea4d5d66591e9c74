"""Reading test sets and corpora: a directory of text files, a JSONL file with a text field, or lines of a text file."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["Reader", "batched"]


class Reader:
    """Yields ``(id, text)`` from ``path`` and keeps a SHA-256 over every byte it read (the corpus digest).

    - a directory: every regular file below it (sorted), one document each, id = relative path;
    - ``*.jsonl`` / ``*.jsonl.gz``: one JSON object per line, text from ``field`` (a list of strings
      is joined), id from ``id_field`` when present, else the line number;
    - any other file: one document per non-empty line, id = the line number.
    """

    def __init__(self, path: Path, *, field: str = "text", id_field: str | None = "id") -> None:
        self.path = path
        self.field = field
        self.id_field = id_field
        self.sha = hashlib.sha256()
        self.count = 0

    @property
    def digest(self) -> str:
        """Return the SHA-256 (hex) of the bytes read so far."""
        return self.sha.hexdigest()

    def __iter__(self) -> Iterator[tuple[str, str]]:
        if not self.path.exists():
            raise ValueError(f"{self.path} does not exist")
        if self.path.is_dir():
            yield from self._directory()
        elif self.path.name.endswith((".jsonl", ".jsonl.gz")):
            yield from self._jsonl()
        else:
            yield from self._lines()

    def _open(self) -> IO[bytes]:
        if self.path.name.endswith(".gz"):
            return gzip.open(self.path, "rb")  # type: ignore[return-value]  # a GzipFile reads bytes like IO[bytes]
        return self.path.open("rb")

    def _directory(self) -> Iterator[tuple[str, str]]:
        for file in sorted(p for p in self.path.rglob("*") if p.is_file() and not p.is_symlink()):
            data = file.read_bytes()
            self.sha.update(data)
            self.count += 1
            yield file.relative_to(self.path).as_posix(), data.decode("utf-8", errors="replace")

    def _text_of(self, obj: Any, lineno: int) -> str:
        if not isinstance(obj, dict) or self.field not in obj:
            keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{self.path}:{lineno}: no field {self.field!r} (has: {keys})")
        value = obj[self.field]
        if isinstance(value, list):
            return "\n".join(str(v) for v in value)
        return str(value)

    def _jsonl(self) -> Iterator[tuple[str, str]]:
        with self._open() as fh:
            for lineno, line in enumerate(fh, 1):
                self.sha.update(line)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{self.path}:{lineno}: not JSON ({exc.msg})") from None
                text = self._text_of(obj, lineno)
                doc_id = obj.get(self.id_field) if self.id_field else None
                self.count += 1
                yield (str(doc_id) if doc_id is not None else str(lineno)), text

    def _lines(self) -> Iterator[tuple[str, str]]:
        with self._open() as fh:
            for lineno, line in enumerate(fh, 1):
                self.sha.update(line)
                if line.strip():
                    self.count += 1
                    yield str(lineno), line.decode("utf-8", errors="replace")


def batched(documents: Iterator[tuple[str, str]] | Reader, size: int) -> Iterator[list[tuple[str, str]]]:
    """Yield lists of at most ``size`` documents."""
    batch: list[tuple[str, str]] = []
    for doc in documents:
        batch.append(doc)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
