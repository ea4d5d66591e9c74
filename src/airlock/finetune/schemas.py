"""OpenAI wire shapes of the files API, so the ``openai`` SDK works unchanged."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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


class Hyperparameters(BaseModel):
    """Training hyperparameters; each is ``"auto"`` or a number."""

    model_config = ConfigDict(extra="forbid")
    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"


class Method(BaseModel):
    """The fine-tuning method; only supervised fine-tuning is offered."""

    type: Literal["supervised"] = "supervised"
    supervised: dict[str, Any] | None = None


class FineTuningJobCreate(BaseModel):
    """``POST /v1/fine_tuning/jobs`` body (OpenAI shape)."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(description="The granted `{model}/{variant}` to fine-tune.")
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    suffix: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9._-]*$")
    seed: int | None = None
    method: Method | None = None


class JobError(BaseModel):
    """Why a job failed."""

    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    """A fine-tuning job as OpenAI describes it."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    result_files: list[str] = Field(default_factory=list)
    status: str
    hyperparameters: dict[str, Any]
    training_file: str
    validation_file: str | None
    trained_tokens: int | None
    error: JobError | None
    seed: int
    suffix: str | None = None
    method: Method = Field(default_factory=Method)
    estimated_finish: int | None = None
    integrations: list[Any] | None = None
    user_provided_suffix: str | None = None


class FineTuningJobList(BaseModel):
    """A page of jobs, newest first."""

    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(BaseModel):
    """A progress or metrics event of a job."""

    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"] = "info"
    message: str
    data: dict[str, Any] | None = None
    type: Literal["message", "metrics"] = "message"


class FineTuningJobEventList(BaseModel):
    """A page of events, newest first."""

    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class FineTuningJobCheckpoint(BaseModel):
    """A training checkpoint (metrics only: checkpoint weights never leave the lab)."""

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, float | None]
    step_number: int


class FineTuningJobCheckpointList(BaseModel):
    """A job's checkpoints."""

    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None
