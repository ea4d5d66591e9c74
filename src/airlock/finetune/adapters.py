"""Where fine-tuning jobs keep their checkpoints and adapters on the lab's side: the one place that knows the layout.

A job's directory is ``<home>/finetune/<job_id>/`` (checkpoints under ``checkpoints/step-N/``, each
with its adapter in ``adapter/``; the final adapter under ``adapter/``). The store deliberately has
no method that returns adapter bytes to a caller: adapters are only ever loaded by a backend of the
lab to serve the grantee's requests, and no endpoint serves them as files (the weights never
leave); anything that needs to identify an adapter uses :meth:`AdapterStore.sha256`.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

__all__ = ["AdapterStore", "adapter_dir_sha256"]

_JOB_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def adapter_dir_sha256(directory: Path) -> str:
    r"""Return the SHA-256 hex of an adapter directory: the hash of its sorted ``name\0sha256\n`` lines."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    lines: list[str] = []
    for path in files:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        lines.append(f"{path.relative_to(directory).as_posix()}\0{digest.hexdigest()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


class AdapterStore:
    """Fine-tuning jobs' directories under ``root/<job_id>/``, their adapters in ``adapter/`` (never handed out)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def of_home(cls, home: Path) -> AdapterStore:
        """Return the store of the data directory ``home``."""
        return cls(home / "finetune")

    def job_dir(self, job_id: str) -> Path:
        """Return the working directory of ``job_id`` (checkpoints and adapter; may not exist yet)."""
        # Job ids become path components: refuse anything that could escape the root.
        if not _JOB_ID.fullmatch(job_id) or job_id in (".", ".."):
            raise ValueError(f"invalid job id {job_id!r}")
        return self.root / job_id

    def path(self, job_id: str) -> Path:
        """Return the directory of ``job_id``'s adapter (a ``save_pretrained`` dir; may not exist yet)."""
        return self.job_dir(job_id) / "adapter"

    def checkpoint_path(self, job_id: str, step: int) -> Path:
        """Return the directory of the adapter ``job_id`` saved at training step ``step`` (may not exist)."""
        return self.job_dir(job_id) / "checkpoints" / f"step-{int(step)}" / "adapter"

    def exists(self, job_id: str) -> bool:
        """Return whether ``job_id`` has a complete adapter (its config and weights are present)."""
        directory = self.path(job_id)
        return (directory / "adapter_config.json").is_file() and any(directory.glob("adapter_model.*"))

    def sha256(self, job_id: str) -> str:
        """Return the content hash of ``job_id``'s adapter (see :func:`adapter_dir_sha256`)."""
        if not self.exists(job_id):
            raise FileNotFoundError(f"no adapter for job {job_id!r}")
        return adapter_dir_sha256(self.path(job_id))

    def delete(self, job_id: str) -> bool:
        """Delete ``job_id``'s adapter; return whether there was one."""
        directory = self.path(job_id)
        if not directory.exists():
            return False
        shutil.rmtree(directory)
        return True
