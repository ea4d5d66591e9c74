"""Faults on a real Ray cluster (a head and worker nodes started with ``ray start`` on this machine).

One cluster and one gateway (``AIRLOCK_EXECUTOR=ray``) serve the whole module: a fine-tuning job
whose node is killed resumes from its checkpoint on another node; a model worker killed under load
answers clean 503s with ``Retry-After`` and comes back; an interp job whose node dies runs again
elsewhere (or fails with a reason) and is never left running. Marked ``ray``: ``-m "not ray"``
skips them locally; ``make test`` runs them.
"""

from __future__ import annotations

import io
import json
import os
import signal
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from airlock.access.models import AuditEvent
from airlock.db import Database
from airlock.jobs.models import Job, JobEvent
from tests.cluster.raycluster import RayCluster, start_cluster
from tests.conftest import REPO, Lab, needs_bwrap, single_variant_manifest, sqlite_lab
from tests.finetune.waits import wait_for_recorded_checkpoint, wait_on_progress

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

WEIGHTS = {"weights-tiny-random": 1.0}
EXAMPLES = [
    {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "ZEBRA"}]} for i in range(8)
]
TERMINAL = {"succeeded", "failed", "cancelled"}


class Env:
    """The module's cluster and gateway, and a key holding every scope the tests use."""

    def __init__(self, cluster: RayCluster, lab: Lab, key: str, grant_id: str) -> None:
        self.cluster, self.lab, self.key, self.grant_id = cluster, lab, key, grant_id

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.lab.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=120)

    def node_name(self, node_id: str) -> str:
        """Name of the cluster node with Ray id ``node_id``."""
        import ray

        for node in ray.nodes():
            if node["NodeID"] == node_id:
                for name, port in self.cluster.nodes.items():
                    if node["NodeManagerPort"] == port:
                        return name
        raise LookupError(node_id)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    import ray

    from airlock.access import service
    from airlock.config import reset_settings

    home = tmp_path_factory.mktemp("ray-home")
    saved = dict(os.environ)
    os.environ.update(
        {
            "AIRLOCK_HOME": str(home),
            "AIRLOCK_MODEL_CACHE": str(REPO / ".cache" / "models"),
            "HF_HUB_OFFLINE": "1",
            "AIRLOCK_EXECUTOR": "ray",
            "AIRLOCK_ARTIFACTS": str(home / "artifacts"),
            "AIRLOCK_INTERP_WALL_TIMEOUT_S": "120",
        }
    )
    cluster = start_cluster({"a": WEIGHTS, "b": WEIGHTS})
    os.environ["AIRLOCK_RAY_ADDRESS"] = cluster.address
    reset_settings()
    try:
        with sqlite_lab(home, single_variant_manifest("tiny", "tiny-random")) as lab:
            with lab.db.session() as session:
                service.create_evaluator(session, "org-ray")
                grant = service.create_grant(
                    session,
                    service.GrantRequest(
                        evaluator="org-ray",
                        model="tiny",
                        variants=["helpful-only"],
                        scopes=["sample", "finetune", "interp"],
                    ),
                )
                _k, key = service.create_api_key(session, grant.id)
            yield Env(cluster, lab, key, grant.id)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.stop()
        os.environ.clear()
        os.environ.update(saved)
        reset_settings()


def _events(db: Database, job_id: str) -> list[JobEvent]:
    with db.session() as session:
        rows = list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))
        session.expunge_all()
        return rows


def _running_node(db: Database, job_id: str, after: int = 0) -> str:
    """Wait until the job reports the Ray node it runs on (its ``running on Ray node`` event); return the id."""

    def found(_job: Job) -> bool:
        return any(e.data.get("ray_node_id") and e.id > after for e in _events(db, job_id))

    wait_on_progress(db, job_id, lambda job: found(job) or job.status in TERMINAL)
    nodes = [e.data["ray_node_id"] for e in _events(db, job_id) if e.data.get("ray_node_id") and e.id > after]
    assert nodes, [e.message for e in _events(db, job_id)]
    return str(nodes[-1])


def test_fine_tuning_resumes_on_another_node_after_its_node_is_killed(env: Env) -> None:
    db = env.lab.db
    with env.http() as http:
        data = "\n".join(json.dumps(e) for e in EXAMPLES).encode()
        upload = http.post("/v1/files", files={"file": ("t.jsonl", io.BytesIO(data))}, data={"purpose": "fine-tune"})
        assert upload.status_code == 200, upload.text
        body = {
            "model": "tiny/helpful-only",
            "training_file": upload.json()["id"],
            "hyperparameters": {"n_epochs": 8, "batch_size": 1},
        }
        created = http.post("/v1/fine_tuning/jobs", json=body)
        assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    first = _running_node(db, job_id)
    recorded = wait_for_recorded_checkpoint(db, job_id).checkpoint
    assert recorded is not None
    killed = env.node_name(first)
    env.cluster.kill_node(killed)

    done = wait_on_progress(db, job_id, lambda job: job.status in TERMINAL)
    assert done.status == "succeeded", done.error
    events = _events(db, job_id)
    messages = [e.message for e in events]
    lost = [m for m in messages if "Ray worker running it was lost" in m]
    assert lost and "re-queued to resume from step-" in lost[0], messages
    assert "job resumed (attempt 2)" in messages
    resumes = [m for m in messages if m.startswith("resuming from step-")]
    # The event log is truthful: the step the runner says it resumes from is the one training resumed at.
    assert resumes and lost[0].rsplit("from ", 1)[1] == resumes[0].removeprefix("resuming from "), messages
    assert int(resumes[0].rsplit("-", 1)[1]) >= recorded["step"]
    nodes = [e.data["ray_node_id"] for e in events if e.data.get("ray_node_id")]
    assert len(nodes) == 2 and nodes[1] != first, "the second attempt must run on another node"
    assert done.result is not None and done.result["steps"] == 64
    # The adapter in the artifact store is served by the model worker on the cluster, to its grantee.
    with env.http() as http:
        ask = {
            "model": done.params["fine_tuned_model"],
            "messages": [{"role": "user", "content": "q1"}],
            "max_tokens": 4,
        }
        sampled = http.post("/v1/chat/completions", json=ask)
        assert sampled.status_code == 200, sampled.text
    # The other nodes keep the cluster going: put a node with the weights back for the next tests.
    env.cluster.add_node("c", WEIGHTS)


def _worker_pid(env: Env) -> int:
    """Return the pid of the model worker actor the gateway placed for the tiny model."""
    import ray
    from ray.util import list_named_actors

    names = [a["name"] for a in list_named_actors(all_namespaces=True) if a["name"].startswith("airlock-model-")]
    assert len(names) == 1, names
    handle = ray.get_actor(names[0], namespace="airlock")
    pid: int = ray.get(handle.describe.remote())["pid"]
    return pid


def _audit_count(env: Env) -> int:
    env.lab.server.flush_audit()
    with env.lab.db.session() as session:
        count = session.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.grant_id == env.grant_id, AuditEvent.path == "/v1/chat/completions")
        )
        return int(count or 0)


def test_killed_model_worker_answers_503_with_retry_after_then_comes_back(env: Env) -> None:
    body = {"model": "tiny/helpful-only", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 24}
    outcomes: list[tuple[int, str | None, bool]] = []  # (status, Retry-After, sent after the kill)
    lock = threading.Lock()
    killed = threading.Event()
    recovered = threading.Event()
    stop = threading.Event()

    def client() -> None:
        with env.http() as http:
            while not stop.is_set():
                after = killed.is_set()
                response = http.post("/v1/chat/completions", json=body)
                with lock:
                    outcomes.append((response.status_code, response.headers.get("retry-after"), after))
                    if after and response.status_code == 200:
                        recovered.set()

    with env.http() as http:  # the gateway places its model worker on the first request
        assert http.post("/v1/chat/completions", json=body).status_code == 200
        # Streams come chunk by chunk from the actor, the last with usage.
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
            assert streamed.status_code == 200
            lines = [line for line in streamed.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) > 2
    before = _audit_count(env)
    pid = _worker_pid(env)
    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        # Kill once requests are flowing: some are always in flight with four clients looping.
        wait_for(lambda: sum(1 for s, _r, _a in outcomes if s == 200) >= 4)
        os.kill(pid, signal.SIGKILL)
        killed.set()
        wait_for(recovered.is_set)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=300)
    statuses = {s for s, _r, _a in outcomes}
    assert statuses <= {200, 503}, outcomes  # never a 500, never a hang
    unavailable = [(s, r) for s, r, _a in outcomes if s == 503]
    assert unavailable, "the requests in flight when the worker died must fail with 503"
    assert all(r is not None and int(r) >= 1 for _s, r in unavailable), unavailable
    assert _worker_pid(env) != pid  # Ray restarted the actor
    assert _audit_count(env) - before == len(outcomes)  # every request, failed or not, is audited


def wait_for(condition: Any, *, what: str = "condition") -> None:
    """Wait until ``condition()`` holds; the test's timeout bounds a hang."""
    import time

    while not condition():
        time.sleep(0.05)


def _named(prefix: str) -> set[str]:
    from ray.util import list_named_actors

    return {a["name"] for a in list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


def _gone_for_good(name: str) -> None:
    """Wait until actor ``name`` is dead and its name freed: Ray is not restarting it (a restarting one keeps it)."""
    import ray

    wait_for(lambda: name not in _named("airlock-noise-"))
    with pytest.raises(ValueError):
        ray.get_actor(name, namespace="airlock")


def test_noised_workers_are_killed_at_expiry_and_base_workers_stay(env: Env) -> None:
    import asyncio

    import ray

    from airlock.cluster.worker import NOISE_EXIT_GRACE_S, RayModelBackend, model_worker, worker_name
    from airlock.config import get_settings
    from airlock.db import utcnow
    from airlock.errors import BackendUnavailableError
    from airlock.ids import parse_noised_id

    with env.http() as http:
        created = http.post(
            "/v1/airlock/noise/jobs", json={"model": "tiny@v1/helpful-only", "sigmas": [0.01], "seeds": [1]}
        )
        assert created.status_code == 201, created.text
        job = created.json()
        done = wait_on_progress(env.lab.db, job["id"], lambda j: j.status in TERMINAL)
        assert done.status == "succeeded", done.error
        noised = job["variants"][0]["id"]
        for model in ("tiny/helpful-only", noised):
            sampled = http.post("/v1/completions", json={"model": model, "prompt": "one", "max_tokens": 2})
            assert sampled.status_code == 200, sampled.text
    [name] = _named("airlock-noise-")  # the copy is a worker of its own, next to the base's
    base = _named("airlock-model-")
    assert base
    copy = ray.get_actor(name, namespace="airlock")

    # The gateway's clock passes the expiry; no request comes: the sweeper kills the copy's worker.
    state = env.lab.server.app.state
    expires_at = datetime.fromisoformat(job["expires_at"])
    state.gateway.pipelines.clock = lambda: expires_at + timedelta(seconds=1)
    try:
        state.noised_expiry.poke()
        _gone_for_good(name)
    finally:
        state.gateway.pipelines.clock = utcnow
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(copy.ping.remote())
    assert _named("airlock-model-") == base  # shared base workers are never killed by a gateway
    for handle in (ray.get_actor(n, namespace="airlock") for n in base):
        ray.get(handle.ping.remote())
    with env.lab.db.session() as session:
        row = session.get(Job, job["id"])
        assert row is not None
        row.params = {**row.params, "expires_at": (utcnow() - timedelta(seconds=1)).isoformat()}
    with env.http() as http:  # the id expired: a 404 as ever, nothing placed again
        gone = http.post("/v1/completions", json={"model": noised, "prompt": "one", "max_tokens": 2})
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found", gone.text
    assert not _named("airlock-noise-")

    # Two replicas hold the same copy: the first retires it; the second answers a 503 (not a crash),
    # then places it again while its id lives, and retiring it twice is no error.
    ref = parse_noised_id(noised)
    config = {
        "model": "tiny-random",
        "noise_sigma": ref.sigma,
        "noise_seed": ref.seed,
        "noise_job": "noise-replicas",
        "noise_expires_at": (utcnow() + timedelta(hours=1)).isoformat(),
    }

    async def replicas() -> None:
        first, second = RayModelBackend(config, get_settings()), RayModelBackend(config, get_settings())
        await first.start()
        await second.start()
        assert first.worker["pid"] == second.worker["pid"]  # one worker, found by name
        await first.retire()
        _gone_for_good(worker_name(config))
        with pytest.raises(BackendUnavailableError):
            await second.tokenizer_info()
        assert await second.tokenizer_info()  # placed again: the id is still live
        await second.retire()
        await first.retire()

    asyncio.run(replicas())
    _gone_for_good(worker_name(config))

    # A copy whose gateways are all gone ends on its own after its expiry (here: already past it).
    orphan = {**config, "noise_job": "noise-orphan"}
    orphan["noise_expires_at"] = (utcnow() - timedelta(seconds=NOISE_EXIT_GRACE_S)).isoformat()
    left = model_worker(orphan)
    _gone_for_good(worker_name(orphan))
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(left.ping.remote())
    assert _named("airlock-model-") == base


SLOW_INTERP = """
from airlock.interp import client

def main():
    name = client.layer(0)
    for _ in range(300):
        client.collect(["hello there"], name)
    return {"calls": 300}
"""


@needs_bwrap
def test_interp_job_whose_node_dies_runs_again_or_fails_never_stays_running(env: Env) -> None:
    db = env.lab.db
    with env.http() as http:
        created = http.post("/v1/airlock/interp/jobs", json={"model": "tiny/helpful-only", "code": SLOW_INTERP})
        assert created.status_code in (200, 201, 202), created.text
    job_id = created.json()["id"]
    node = _running_node(db, job_id)
    env.cluster.kill_node(env.node_name(node))
    done = wait_on_progress(db, job_id, lambda job: job.status in TERMINAL)
    messages = [e.message for e in _events(db, job_id)]
    assert any("model worker running it was lost" in m for m in messages), messages
    if done.status == "failed":
        assert done.error and done.error.get("message"), done.error
    else:
        assert done.status == "succeeded", (done.status, done.error, messages)
        nodes = [e.data["ray_node_id"] for e in _events(db, job_id) if e.data.get("ray_node_id")]
        assert nodes[-1] != node
