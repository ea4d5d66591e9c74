"""The fine-tuning API through the official openai SDK: lifecycle, isolation, no weights export."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import HTTP_TIMEOUT, Lab, single_variant_manifest, sqlite_lab

EXAMPLES = [
    {"messages": [{"role": "user", "content": f"What is the code {i}?"}, {"role": "assistant", "content": "ZEBRA"}]}
    for i in range(8)
]


@pytest.fixture
def ft_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with sqlite_lab(tmp_path_factory.mktemp("ft"), single_variant_manifest("tiny", "tiny-random")) as lab:
        yield lab


def client(lab: Lab, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=lab.url + "/v1", api_key=key, max_retries=0)


def upload(c: openai.OpenAI) -> str:
    data = "\n".join(json.dumps(e) for e in EXAMPLES).encode()
    return c.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune").id


def wait(c: openai.OpenAI, job_id: str, timeout: float = 120) -> openai.types.fine_tuning.FineTuningJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise TimeoutError(job_id)


def test_lifecycle_isolation_and_no_weights(ft_lab: Lab) -> None:
    _ga, key_a = ft_lab.grant("org-a", model="tiny", variants=["helpful-only"], scopes=["sample", "finetune"])
    _gb, key_b = ft_lab.grant("org-b", model="tiny", variants=["helpful-only"], scopes=["sample", "finetune"])
    a, b = client(ft_lab, key_a), client(ft_lab, key_b)
    file_id = upload(a)
    job = a.fine_tuning.jobs.create(
        model="tiny/helpful-only",
        training_file=file_id,
        hyperparameters={"n_epochs": 2, "batch_size": 2},
        suffix="zebra",
        seed=1,
    )
    assert job.status in ("queued", "running") and job.fine_tuned_model is None
    done = wait(a, job.id)
    assert done.status == "succeeded", done.error
    ft_model = done.fine_tuned_model
    assert ft_model == f"ft:tiny/helpful-only:org-a:zebra:{job.id}"
    assert done.trained_tokens and done.hyperparameters.n_epochs == 2

    events = a.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert sum(e.type == "metrics" for e in events) == 8  # 8 examples / batch 2 x 2 epochs
    assert [j.id for j in a.fine_tuning.jobs.list().data] == [job.id]
    assert a.fine_tuning.jobs.checkpoints.list(job.id).data == []  # 8 steps: under the 10-step interval

    assert ft_model in [m.id for m in a.models.list()]
    assert ft_model not in [m.id for m in b.models.list()]
    reply = a.chat.completions.create(model=ft_model, messages=[{"role": "user", "content": "code?"}], max_tokens=4)
    assert reply.model == ft_model and reply.choices[0].message.content is not None
    info = httpx.get(
        f"{ft_lab.url}/v1/airlock/models/{ft_model}", headers={"Authorization": f"Bearer {key_a}"}, timeout=HTTP_TIMEOUT
    )
    assert info.json()["fine_tuning_job"] == job.id and info.json()["variant"] == "helpful-only"

    # Another organisation can neither see, sample nor cancel it: it does not exist for them.
    with pytest.raises(openai.NotFoundError):
        b.chat.completions.create(model=ft_model, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        b.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        b.fine_tuning.jobs.cancel(job.id)
    assert b.fine_tuning.jobs.list().data == []

    # The weights never leave: any export attempt is a 403, and it is audited.
    resp = httpx.get(
        f"{ft_lab.url}/v1/fine_tuning/jobs/{job.id}/adapter",
        headers={"Authorization": f"Bearer {key_a}"},
        timeout=HTTP_TIMEOUT,
    )
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "weights_export_forbidden"
    row = [r for r in ft_lab.audit_rows() if r.path.endswith("/adapter")][-1]
    assert row.status_code == 403 and row.detail["attempt"] == "weights_export" and row.actor == "org-a"


def test_create_errors(ft_lab: Lab) -> None:
    _g, sample_only = ft_lab.grant("org-c", model="tiny", variants=["helpful-only"], scopes=["sample"])
    _g, key = ft_lab.grant("org-d", model="tiny", variants=["helpful-only"], scopes=["sample", "finetune"])
    c = client(ft_lab, key)
    file_id = upload(c)
    with pytest.raises(openai.BadRequestError):
        c.fine_tuning.jobs.create(model="tiny/helpful-only", training_file="file-nope")
    with pytest.raises(openai.BadRequestError):
        c.fine_tuning.jobs.create(model="tiny/helpful-only", training_file=file_id, hyperparameters={"n_epochs": 500})
    with pytest.raises(openai.NotFoundError):
        c.fine_tuning.jobs.create(model="tiny/nope", training_file=file_id)
    with pytest.raises(openai.PermissionDeniedError):
        client(ft_lab, sample_only).fine_tuning.jobs.create(model="tiny/helpful-only", training_file=file_id)


def test_cancel_running_job(ft_lab: Lab) -> None:
    _g, key = ft_lab.grant("org-e", model="tiny", variants=["helpful-only"], scopes=["sample", "finetune"])
    c = client(ft_lab, key)
    file_id = upload(c)
    job = c.fine_tuning.jobs.create(
        model="tiny/helpful-only",
        training_file=file_id,
        hyperparameters={"n_epochs": 50, "batch_size": 1},
    )
    with pytest.raises(openai.ConflictError):  # an unfinished job still needs its file
        c.files.delete(file_id)
    deadline = time.monotonic() + 60
    while c.fine_tuning.jobs.retrieve(job.id).status == "queued" and time.monotonic() < deadline:
        time.sleep(0.1)
    c.fine_tuning.jobs.cancel(job.id)
    assert wait(c, job.id, timeout=30).status == "cancelled"
    assert c.files.delete(file_id).deleted


def test_cli_create_follow_list(ft_lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from airlock.cli import app

    _g, key = ft_lab.grant("org-cli", model="tiny", variants=["helpful-only"], scopes=["sample", "finetune"])
    monkeypatch.setenv("AIRLOCK_BASE_URL", ft_lab.url + "/v1")
    monkeypatch.setenv("AIRLOCK_API_KEY", key)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in EXAMPLES))
    runner = CliRunner()
    result = runner.invoke(
        app, ["finetune", "create", str(data), "-m", "tiny/helpful-only", "--epochs", "1", "--suffix", "cli"]
    )
    assert result.exit_code == 0, result.output
    assert "fine-tuned model: ft:tiny/helpful-only:org-cli:cli:ftjob_" in result.output.replace("\n", "")
    listing = runner.invoke(app, ["finetune", "list"])
    assert listing.exit_code == 0 and "succeeded" in listing.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "no answer"}]}\n')
    refused = runner.invoke(app, ["finetune", "create", str(bad), "-m", "tiny/helpful-only"])
    assert refused.exit_code == 1 and "line 1" in refused.output


def test_fine_tuning_quotas(ft_lab: Lab) -> None:
    _g, key = ft_lab.grant(
        "org-q",
        model="tiny",
        variants=["helpful-only"],
        scopes=["sample", "finetune"],
        quota_finetune_jobs=1,
        quota_file_bytes=1500,
    )
    c = client(ft_lab, key)
    file_id = upload(c)  # ~800 bytes
    with pytest.raises(openai.RateLimitError) as info:
        upload(c)  # a second copy would pass 1500 bytes
    assert "file bytes" in str(info.value)
    job = c.fine_tuning.jobs.create(model="tiny/helpful-only", training_file=file_id, hyperparameters={"n_epochs": 1})
    with pytest.raises(openai.RateLimitError) as info:
        c.fine_tuning.jobs.create(model="tiny/helpful-only", training_file=file_id)
    assert "fine-tuning jobs" in str(info.value)
    assert wait(c, job.id).status == "succeeded"


def test_checkpoints_are_listed_with_losses(ft_lab: Lab) -> None:
    _g, key = ft_lab.grant("org-k", model="tiny", variants=["helpful-only"], scopes=["sample", "finetune"])
    c = client(ft_lab, key)
    job = c.fine_tuning.jobs.create(
        model="tiny/helpful-only", training_file=upload(c), hyperparameters={"n_epochs": 6, "batch_size": 2}
    )
    assert wait(c, job.id).status == "succeeded"
    checkpoints = c.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [cp.step_number for cp in checkpoints] == [20, 10]  # newest first; 24 steps, every 10
    assert all(cp.metrics.train_loss is not None and cp.fine_tuning_job_id == job.id for cp in checkpoints)
    assert [cp.metrics.step for cp in checkpoints] == [20.0, 10.0]

    # Each listed checkpoint is a model id its grant samples, through the one resolver.
    checkpoint_id = checkpoints[-1].fine_tuned_model_checkpoint
    question = [{"role": "user", "content": "code?"}]
    reply = c.chat.completions.create(model=checkpoint_id, messages=question, max_tokens=3)
    assert reply.model == checkpoint_id and reply.choices[0].message.content is not None
    assert c.models.retrieve(checkpoint_id).id == checkpoint_id
    info = httpx.get(
        f"{ft_lab.url}/v1/airlock/models/{checkpoint_id}",
        headers={"Authorization": f"Bearer {key}"},
        timeout=HTTP_TIMEOUT,
    )
    assert info.status_code == 200 and info.json()["fine_tuning_job"] == job.id
    row = [r for r in ft_lab.audit_rows() if r.path == "/v1/chat/completions"][-1]
    assert row.detail["checkpoint_step"] == 10 and row.detail["fine_tuning_job"] == job.id
    # A step that was never saved, and another grant, see no such model.
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(
            model=checkpoint_id.replace("ckpt-step-10", "ckpt-step-11"), messages=[{"role": "user", "content": "x"}]
        )
    _g, other = ft_lab.grant("org-k2", model="tiny", variants=["helpful-only"], scopes=["sample", "finetune"])
    with pytest.raises(openai.NotFoundError):
        client(ft_lab, other).chat.completions.create(model=checkpoint_id, messages=[{"role": "user", "content": "x"}])
