"""Training files: validation of chat JSONL, atomic storage under the data dir, org-scoped access."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from airlock.access.seal import verified_grant
from airlock.access.terms import terms_of
from airlock.atomicfile import write_atomically
from airlock.config import get_settings
from airlock.db import utcnow
from airlock.errors import ConflictError, InvalidRequestError, NotFoundError, RateLimitError
from airlock.finetune.models import TrainingFile
from airlock.finetune.terms import FinetuneTerms
from airlock.jobs.models import Job

PURPOSES = ("fine-tune",)
ROLES = frozenset({"system", "user", "assistant"})
MESSAGE_KEYS = frozenset({"role", "content", "name", "weight"})
MAX_FILENAME = 255


class Tokenizer(Protocol):
    """Anything with ``encode(text) -> token ids`` (a Hugging Face tokenizer qualifies)."""

    def encode(self, text: str) -> Sequence[int]:
        """Return the token ids of ``text``."""
        ...


def max_file_bytes() -> int:
    """Return the per-file size limit (``AIRLOCK_MAX_FILE_BYTES``, default 10 MB)."""
    return get_settings().max_file_bytes


def files_dir(home: Path) -> Path:
    """Return the directory holding uploaded files' bytes."""
    return home / "files"


def file_path(home: Path, file_id: str) -> Path:
    """Return where the bytes of ``file_id`` are stored."""
    return files_dir(home) / f"{file_id}.jsonl"


def _bad(line: int, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"line {line}: {message}", code="invalid_file_format", param="file")


def _count_tokens(text: str, tokenizer: Tokenizer | None) -> int:
    if tokenizer is not None:
        return len(tokenizer.encode(text))
    # Without a tokenizer, ~4 bytes per token is the usual estimate for English BPE vocabularies.
    return math.ceil(len(text.encode()) / 4)


def validate_chat_jsonl(
    data: bytes, *, max_tokens_per_example: int | None = None, tokenizer: Tokenizer | None = None
) -> list[dict[str, Any]]:
    """Parse chat fine-tuning JSONL (``{"messages": [...]}`` per line); raise 400 naming the bad line."""
    if not data.strip():
        raise InvalidRequestError("the file is empty", code="invalid_file_format", param="file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(data[: exc.start].count(b"\n") + 1, "not valid UTF-8") from None
    examples: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline, spacing) carry no example
        try:
            example = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _bad(number, f"malformed JSON ({exc.msg})") from None
        if not isinstance(example, dict):
            raise _bad(number, "each line must be a JSON object with a 'messages' list")
        extra = sorted(set(example) - {"messages"})
        if extra:
            raise _bad(number, f"unsupported key(s) {extra}; only 'messages' is accepted")
        messages = example.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad(number, "'messages' must be a non-empty list")
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise _bad(number, f"messages[{index}] must be an object")
            role = message.get("role")
            if role not in ROLES:
                raise _bad(number, f"messages[{index}] has role {role!r}; allowed: system, user, assistant")
            if not isinstance(message.get("content"), str):
                raise _bad(number, f"messages[{index}].content must be a string")
            unknown = sorted(set(message) - MESSAGE_KEYS)
            if unknown:
                raise _bad(number, f"messages[{index}] has unsupported key(s) {unknown}")
        if not any(m["role"] == "assistant" for m in messages):
            raise _bad(number, "an example needs at least one assistant message")
        if max_tokens_per_example is not None:
            tokens = sum(_count_tokens(m["content"], tokenizer) for m in messages)
            if tokens > max_tokens_per_example:
                raise _bad(number, f"example has {tokens} tokens, over the limit of {max_tokens_per_example}")
        examples.append(example)
    if not examples:
        raise InvalidRequestError("the file has no examples", code="invalid_file_format", param="file")
    return examples


def create_file(
    session: Session,
    home: Path,
    *,
    evaluator_id: str,
    grant_id: str,
    filename: str,
    purpose: str,
    data: bytes,
) -> TrainingFile:
    """Validate, store the bytes durably, then add the row (flushed, not committed)."""
    if purpose not in PURPOSES:
        raise InvalidRequestError(
            f"purpose {purpose!r} is not supported; use one of {list(PURPOSES)}",
            code="invalid_purpose",
            param="purpose",
        )
    limit = max_file_bytes()
    if len(data) > limit:
        raise InvalidRequestError(
            f"file is {len(data)} bytes, over the limit of {limit} bytes", code="file_too_large", param="file"
        )
    grant = verified_grant(session, grant_id)
    quota = terms_of(grant, FinetuneTerms).quota_file_bytes
    if quota is not None:
        held = session.scalar(
            select(func.coalesce(func.sum(TrainingFile.bytes), 0)).where(TrainingFile.grant_id == grant_id)
        )
        if int(held or 0) + len(data) > quota:
            raise RateLimitError(
                f"this file would take your grant past its quota of {quota} file bytes ({held} held); delete some",
                code="insufficient_quota",
            )
    examples = validate_chat_jsonl(data)
    file_id = f"file-{secrets.token_hex(12)}"
    path = file_path(home, file_id)
    write_atomically(path, data)
    row = TrainingFile(
        id=file_id,
        evaluator_id=evaluator_id,
        grant_id=grant_id,
        filename=(Path(filename).name or "upload.jsonl")[:MAX_FILENAME],
        purpose=purpose,
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        examples=len(examples),
        created_at=utcnow(),
    )
    try:
        session.add(row)
        session.flush()
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return row


def discard_bytes(home: Path, file_id: str) -> None:
    """Remove a file's bytes (after a failed commit or a delete); missing bytes are fine."""
    with contextlib.suppress(FileNotFoundError):
        file_path(home, file_id).unlink()


def get_file(session: Session, file_id: str, evaluator_id: str) -> TrainingFile:
    """Return a file of the caller's organisation; anyone else's is a 404, revealing nothing."""
    row = session.get(TrainingFile, file_id)
    if row is None or row.evaluator_id != evaluator_id:
        raise NotFoundError(f"no such file: {file_id}", code="file_not_found", param="file_id")
    return row


def list_files(
    session: Session,
    evaluator_id: str,
    *,
    purpose: str | None = None,
    after: str | None = None,
    limit: int = 10000,
    order: str = "desc",
) -> tuple[list[TrainingFile], bool]:
    """Return one page of the organisation's files (OpenAI cursor paging) and has_more."""
    if not 1 <= limit <= 10000:
        raise InvalidRequestError("limit must be between 1 and 10000", param="limit")
    if order not in ("asc", "desc"):
        raise InvalidRequestError("order must be 'asc' or 'desc'", param="order")
    stmt = select(TrainingFile).where(TrainingFile.evaluator_id == evaluator_id)
    if purpose is not None:
        stmt = stmt.where(TrainingFile.purpose == purpose)
    if after is not None:
        cursor = get_file(session, after, evaluator_id)
        if order == "desc":
            stmt = stmt.where(
                or_(
                    TrainingFile.created_at < cursor.created_at,
                    and_(TrainingFile.created_at == cursor.created_at, TrainingFile.id < cursor.id),
                )
            )
        else:
            stmt = stmt.where(
                or_(
                    TrainingFile.created_at > cursor.created_at,
                    and_(TrainingFile.created_at == cursor.created_at, TrainingFile.id > cursor.id),
                )
            )
    if order == "desc":
        stmt = stmt.order_by(TrainingFile.created_at.desc(), TrainingFile.id.desc())
    else:
        stmt = stmt.order_by(TrainingFile.created_at.asc(), TrainingFile.id.asc())
    rows = list(session.scalars(stmt.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def read_content(session: Session, home: Path, file_id: str, evaluator_id: str) -> tuple[TrainingFile, bytes]:
    """Return a file's row and bytes, for its own organisation only (the trainer uses this too)."""
    row = get_file(session, file_id, evaluator_id)
    try:
        data = file_path(home, file_id).read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"the content of {file_id} is missing", code="file_content_missing") from None
    return row, data


def delete_file(session: Session, file_id: str, evaluator_id: str) -> str:
    """Delete the row (the caller removes the bytes with ``discard_bytes`` once committed)."""
    row = get_file(session, file_id, evaluator_id)
    # A queued or running job reads the file when it starts or resumes: deleting it would fail the job.
    active = session.scalars(
        select(Job).where(Job.evaluator_id == evaluator_id, Job.status.in_(("queued", "running")))
    ).all()
    users = [j.id for j in active if file_id in (j.params.get("training_file"), j.params.get("validation_file"))]
    if users:
        raise ConflictError(f"file {file_id} is used by unfinished job(s) {users}; cancel them or wait")
    session.delete(row)
    session.flush()
    return file_id
