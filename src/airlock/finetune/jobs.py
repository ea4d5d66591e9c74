"""The fine-tuning job handler: runs LoRA training for a queued job, resumably, with progress events."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from airlock.access import sealing
from airlock.finetune import events
from airlock.finetune.adapters import AdapterStore
from airlock.finetune.files import discard_bytes, file_path, validate_chat_jsonl
from airlock.finetune.models import TrainingFile
from airlock.finetune.trainer import TrainingCancelled, result_dict, train_lora
from airlock.jobs import service as jobs_service
from airlock.jobs.models import TERMINAL_STATUSES, Job
from airlock.jobs.runner import JobCancelled, JobContext

KIND = "fine_tune"


def recorded_checkpoint(record: dict[str, Any] | None) -> Path | None:
    """Return the checkpoint directory a job's record names, if it is complete on disk."""
    if not record or not isinstance(record.get("path"), str):
        return None
    path = Path(record["path"])
    return path if (path / "state.json").is_file() else None


class FineTuneHandler:
    """Trains a LoRA adapter from an uploaded chat JSONL file; resumes from its last checkpoint."""

    resumable = True

    def __init__(self, home: Path, *, checkpoint_every: int = 10) -> None:
        self.home = home
        self.checkpoint_every = checkpoint_every

    def on_finished(self, session: Session, job: Job) -> None:
        """Put the job's outcome on the public record, in the terminal transition's transaction."""
        events.job_finished(session, job)
        self._apply_retention(session, job)

    def _apply_retention(self, session: Session, job: Job) -> None:
        """Seal or drop the content of the job's files as their grant's ``retention_finetune`` says.

        ``full`` keeps the bytes; ``sealed`` stores them encrypted to the evaluator's seal key
        (``sealed.stored``) and ``none`` keeps nothing; in both the readable bytes go once the
        terminal transition commits, so a rolled-back finish keeps a file a re-run needs. Rows
        (size, hash, counts) stay. A file another unfinished job still reads is left for that
        job's own finish. Adapters and checkpoints (weights, no training text) are kept.
        """
        used = [job.params.get("training_file"), job.params.get("validation_file")]
        still_read = {
            name
            for params in session.scalars(
                select(Job.params).where(Job.kind == KIND, Job.id != job.id, Job.status.notin_(TERMINAL_STATUSES))
            )
            for name in (params.get("training_file"), params.get("validation_file"))
        }
        doomed = []
        for file_id in sorted({f for f in used if isinstance(f, str) and f not in still_read}):
            row = session.get(TrainingFile, file_id)
            if row is None:
                continue
            plan = sealing.disposition(session, row.grant_id, "finetune")
            if plan.action == "keep":
                continue
            doomed.append(file_id)
            path = file_path(self.home, file_id)
            if not path.is_file():
                continue  # an earlier job's finish already sealed or dropped it
            item = sealing.dispose(
                session,
                plan,
                kind="training_file",
                ref=file_id,
                name=row.filename,
                data=path.read_bytes(),
                home=self.home,
            )
            if item is not None:
                jobs_service.add_event(session, job.id, f"file {file_id} sealed to the evaluator's key as {item.id}")
            elif plan.action == "seal" or plan.reason:
                jobs_service.add_event(session, job.id, f"file {file_id}: {plan.reason or 'sealing failed'}")
        if doomed:
            home = self.home

            def discard(_session: Session) -> None:
                for file_id in doomed:
                    discard_bytes(home, file_id)

            event.listen(session, "after_commit", discard, once=True)

    def output_dir(self, job_id: str) -> Path:
        """Return where a job's checkpoints and adapter live (never served to anyone)."""
        return AdapterStore.of_home(self.home).job_dir(job_id)

    def run(self, ctx: JobContext) -> dict[str, Any]:
        """Validate the files, train, and return the training summary."""
        params = ctx.params
        train = validate_chat_jsonl(file_path(self.home, params["training_file"]).read_bytes())
        valid = None
        if params.get("validation_file"):
            valid = validate_chat_jsonl(file_path(self.home, params["validation_file"]).read_bytes())
        out_dir = self.output_dir(ctx.job_id)
        # The job's recorded checkpoint is the one source of truth: the runner's restart event and
        # this resume both read it, so they cannot disagree. A step directory written after the
        # last record (the process died in between) is simply trained again.
        resume = recorded_checkpoint(ctx.checkpoint)
        if ctx.checkpoint and resume is None:
            ctx.emit(f"checkpoint {ctx.checkpoint.get('path')} is missing or incomplete; training from the start")
        ctx.emit(
            f"resuming from {resume.name}" if resume else f"training on {len(train)} examples",
            examples=len(train),
            validation_examples=len(valid or []),
        )

        def on_step(info: Any) -> None:
            values = {"train_loss": info.train_loss, "total_steps": float(info.total_steps)}
            if info.valid_loss is not None:
                values["valid_loss"] = info.valid_loss
            ctx.metrics(info.step, **values)
            ctx.progress(info.step / max(1, info.total_steps))

        def on_checkpoint(step: int, path: Path) -> None:
            ctx.save_checkpoint({"step": step, "path": str(path)})

        hyper = params.get("hyperparameters") or {}
        try:
            result = train_lora(
                params["base_model"],
                train,
                out_dir=out_dir,
                validation_examples=valid,
                n_epochs=hyper.get("n_epochs", "auto"),
                batch_size=hyper.get("batch_size", "auto"),
                learning_rate_multiplier=hyper.get("learning_rate_multiplier", "auto"),
                seed=int(params.get("seed") or 0),
                on_step=on_step,
                on_checkpoint=on_checkpoint,
                should_stop=ctx.cancelled,
                resume_from=resume,
                checkpoint_every=int(params.get("checkpoint_every") or self.checkpoint_every),
                device=str(params.get("device") or "cpu"),
            )
        except TrainingCancelled:
            raise JobCancelled() from None
        summary = result_dict(result)
        ctx.emit("training finished", steps=result.steps, trained_tokens=result.trained_tokens)
        return {**summary, "fine_tuned_model": params.get("fine_tuned_model")}
