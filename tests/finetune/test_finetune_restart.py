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
from airlock.finetune.jobs import latest_checkpoint
from tests.conftest import single_variant_manifest

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
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError("airlock serve did not start")


@pytest.fixture
def home(airlock_env: Path) -> Iterator[Path]:
    airlock_env.mkdir(parents=True, exist_ok=True)
    (airlock_env / "airlock.yaml").write_text(yaml.safe_dump(single_variant_manifest("tiny", "tiny-random")))
    yield airlock_env


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
        db.dispose()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        data = "\n".join(json.dumps(e) for e in EXAMPLES).encode()
        file_id = client.files.create(file=("t.jsonl", io.BytesIO(data)), purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(
            model="tiny/helpful-only", training_file=file_id, hyperparameters={"n_epochs": 25, "batch_size": 1}
        )
        out_dir = home / "finetune" / job.id
        deadline = time.monotonic() + 60
        # Only a complete checkpoint counts: a temporary directory still being written does not.
        while latest_checkpoint(out_dir) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert latest_checkpoint(out_dir) is not None, "no checkpoint was written"
    finally:
        proc.send_signal(signal.SIGKILL)  # no graceful shutdown: the job is left "running"
        proc.wait()
    proc = _serve(home, port)
    try:
        deadline = time.monotonic() + 120
        status = ""
        while time.monotonic() < deadline:
            status = client.fine_tuning.jobs.retrieve(job.id).status
            if status in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.2)
        assert status == "succeeded"
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data]
        assert any(m.startswith("resuming from step-") for m in messages)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
