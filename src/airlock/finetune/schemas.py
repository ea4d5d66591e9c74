"""OpenAI wire shapes of the files API, so the ``openai`` SDK works unchanged."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from airlock.finetune.models import TrainingFile


class FileObject(BaseModel):
    """An uploaded file as OpenAI describes it."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None

    @classmethod
    def of(cls, row: TrainingFile) -> FileObject:
        """Build from a row."""
        return cls(
            id=row.id,
            bytes=row.bytes,
            created_at=int(row.created_at.timestamp()),
            filename=row.filename,
            purpose=row.purpose,
        )


class FileList(BaseModel):
    """A page of files, newest first."""

    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class FileDeleted(BaseModel):
    """The answer to a delete."""

    id: str
    object: Literal["file"] = "file"
    deleted: bool
