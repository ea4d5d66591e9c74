"""A fine-tuning job survives the gateway process being killed mid-training and resumes on restart."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from airlock.access import service
from airlock.db import Database
from tests.conftest import single_variant_manifest
from tests.finetune.waits import wait_for_recorded_checkpoint, wait_for_status

EXAMPLES = [
    {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "ZEBRA"}]} for i in range(8)
]


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _serve(home: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AIRLOCK_HOME": str(home), "AIRLOCK_JOB_STALE_AFTER_S": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "airlock", "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Wait as long as the process is alive and starting (a loaded machine only makes it slower);
    # the cap bounds a hang, not a slow start.
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"airlock serve did not start (exit code {proc.poll()})")


@pytest.fixture
def home(airlock_env: Path) -> Iterator[Path]:
    airlock_env.mkdir(parents=True, exist_ok=True)
    (airlock_env / "airlock.yaml").write_text(yaml.safe_dump(single_variant_manifest("tiny", "tiny-random")))
    db = Database(f"sqlite:///{airlock_env / 'airlock.db'}")
    db.migrate()  # `serve` refuses an unmigrated database: migrating is the operator's explicit step
    db.dispose()
    yield airlock_env


@pytest.mark.slow
def test_job_resumes_after_the_server_is_killed(home: Path) -> None:
    port = _port()
    proc = _serve(home, port)
    try:
        db = Database(f"sqlite:///{home / 'airlock.db'}")
        with db.session() as session:
            service.create_evaluator(session, "org-r")
            grant = service.create_grant(
                session,
                service.GrantRequest(
                    evaluator="org-r", model="tiny", variants=["helpful-only"], scopes=["sample", "finetune"]
                ),
            )
            _k, key = service.create_api_key(session, grant.id)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        data = "\n".join(json.dumps(e) for e in EXAMPLES).encode()
        file_id = client.files.create(file=("t.jsonl", io.BytesIO(data)), purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(
            model="tiny/helpful-only", training_file=file_id, hyperparameters={"n_epochs": 25, "batch_size": 1}
        )
        # Wait on the job's own record (the one a restart resumes from), not on files or the clock.
        recorded = wait_for_recorded_checkpoint(db, job.id).checkpoint
        assert recorded is not None
    finally:
        proc.send_signal(signal.SIGKILL)  # no graceful shutdown: the job is left "running"
        proc.wait()
    proc = _serve(home, port)
    try:
        finished = wait_for_status(db, job.id, {"succeeded", "failed", "cancelled"})
        assert finished.status == "succeeded", finished.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data]
        # The restart event and the handler's resume agree on the step (the job's recorded checkpoint).
        restarts = [m for m in messages if "re-queued to resume from step-" in m]
        resumes = [m for m in messages if m.startswith("resuming from step-")]
        assert restarts and resumes, messages
        assert restarts[0].rsplit("from ", 1)[1] == resumes[0].removeprefix("resuming from "), messages
        assert int(resumes[0].rsplit("-", 1)[1]) >= recorded["step"]
    finally:
        db.dispose()
        proc.terminate()
        proc.wait(timeout=30)
