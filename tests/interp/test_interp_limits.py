"""Interp job limits: host model time counted inside a call, CPU over the runner's whole process tree, and
job errors that name the real cause of a runner's end."""

from __future__ import annotations

import concurrent.futures
import signal
import socket
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from airlock.interp import _wire, deadline, rpc, run
from airlock.interp.rpc import RpcServer
from airlock.interp.run import RunOutcome
from airlock.interp.workers import ThreadWorker
from airlock.sandbox import ResourceLimits, SandboxResult, Termination
from tests.conftest import needs_bwrap

# ------------------------------------------------------------------------------ a fake slow model


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Layer(torch.nn.Module):
    def __init__(self, ran: list[int], index: int, tick: Callable[[], None]) -> None:
        super().__init__()
        self.ran, self.index, self.tick = ran, index, tick

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.ran.append(self.index)
        self.tick()
        return x + 1


class _SlowModel(torch.nn.Module):
    """Decoder-shaped (``model.layers``, an unembedding); each layer calls ``tick`` (advance a clock, or sleep)."""

    def __init__(self, layers: int, tick: Callable[[], None]) -> None:
        super().__init__()
        self.ran: list[int] = []
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(_Layer(self.ran, i, tick) for i in range(layers))
        self.lm_head = torch.nn.Identity()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.model.layers:
            x = layer(x)
        out: torch.Tensor = self.lm_head(x)
        return out


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(module._forward_pre_hooks) for module in model.modules())


def test_a_call_stops_at_the_layer_where_its_deadline_passes() -> None:
    clock = _Clock()

    def tick() -> None:
        clock.now += 1.0  # each layer takes one "second"

    model, bystander = _SlowModel(100, tick), _SlowModel(3, tick)
    budget = deadline.Deadline(at=5.5, message="out of time", clock=clock)
    with pytest.raises(deadline.DeadlineExceeded, match="out of time") as caught, deadline.enforced(model, budget):
        model(torch.zeros(1))
    # Layers start at t = 0..5 (all before 5.5); the check before the 7th sees t = 6 and stops the pass.
    assert model.ran == [0, 1, 2, 3, 4, 5]
    assert caught.value.code == "host_time_limit" and caught.value.checks == 7  # entry + 6 layers
    # The hooks lived on that instance only, and only for the call.
    assert _hook_count(model) == 0 and _hook_count(bystander) == 0
    assert not torch.nn.modules.module._global_forward_pre_hooks
    model.ran.clear()
    model(torch.zeros(1))
    assert len(model.ran) == 100


def test_a_call_past_its_deadline_does_not_start() -> None:
    clock = _Clock()
    clock.now = 10.0
    model = _SlowModel(4, lambda: None)
    with (
        pytest.raises(deadline.DeadlineExceeded),
        deadline.enforced(model, deadline.Deadline(at=10.0, message="x", clock=clock)),
    ):
        model(torch.zeros(1))
    assert model.ran == [] and _hook_count(model) == 0


def test_checkpoints_cover_decoder_parts_and_the_unembedding(tiny_worker: ThreadWorker) -> None:
    model = tiny_worker.model
    found = deadline.checkpoints(model)
    layers = model.model.layers
    assert layers[0] in found and layers[1].mlp in found and layers[1].self_attn in found
    assert model.get_output_embeddings() in found
    assert model.model.embed_tokens not in found  # nothing of the embeddings is touched


class _Worker:
    """A ModelWorker owning a fake model on one thread."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def submit(self, fn: Callable[[Any, Any], Any]) -> concurrent.futures.Future[Any]:
        return self._pool.submit(fn, self.model, None)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


LAYER_S = 0.02


@pytest.fixture
def slow_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., tuple[RpcServer, socket.socket]]]:
    model = _SlowModel(1000, lambda: time.sleep(LAYER_S))  # 20 s per call without a deadline
    worker = _Worker(model)

    def trace(m: Any, _t: Any, _request: Any, *_args: Any, **_kwargs: Any) -> dict[str, Any]:
        return {"sum": float(m(torch.zeros(1)).sum())}

    monkeypatch.setattr(rpc, "run_trace", trace)
    opened: list[tuple[RpcServer, socket.socket]] = []

    def make(**kwargs: Any) -> tuple[RpcServer, socket.socket]:
        host_end, runner_end = socket.socketpair()
        server = RpcServer(host_end, worker, {"ok": True}, **kwargs)
        server.start()
        opened.append((server, runner_end))
        return server, runner_end

    yield make
    for server, runner_end in opened:
        runner_end.close()
        server.join(10)
        server.sock.close()
    worker.close()


def test_host_model_time_stops_the_call_that_crosses_it(slow_server: Callable[..., Any]) -> None:
    budget = 0.3
    server, runner = slow_server(max_model_seconds=budget)
    model: _SlowModel = server.worker.model
    _wire.send(runner, {"op": "trace", "prompts": ["x"]})
    reply, _ = _wire.recv(runner, 1 << 20)
    assert reply["ok"] is False and reply["code"] == "host_time_limit"
    assert "host model time of 0.3 s ran out during this call" in reply["error"]
    # Each layer sleeps at least LAYER_S, and no layer starts once the budget is spent: at most
    # budget / LAYER_S layers ran (fewer on a loaded machine), of the 1000 the call wanted.
    assert 1 <= len(model.ran) <= round(budget / LAYER_S)
    assert server.stats.model_seconds >= budget - server.stats.rpc_seconds - 1e-6
    assert _hook_count(model) == 0
    # The budget is spent: the next call is refused before it starts.
    _wire.send(runner, {"op": "trace", "prompts": ["x"]})
    again, _ = _wire.recv(runner, 1 << 20)
    assert again["code"] == "host_time_limit" and len(model.ran) <= round(budget / LAYER_S)
    assert server._thread.is_alive()


def test_the_wall_clock_also_bounds_a_call(slow_server: Callable[..., Any]) -> None:
    server, runner = slow_server(max_model_seconds=600.0, wall_deadline=time.monotonic() + 0.2)
    _wire.send(runner, {"op": "trace", "prompts": ["x"]})
    reply, _ = _wire.recv(runner, 1 << 20)
    assert reply["code"] == "timeout" and "wall-clock limit" in reply["error"]
    assert len(server.worker.model.ran) <= round(0.2 / LAYER_S)


# ------------------------------------------------------------------------------ diagnoses

LIMITS = ResourceLimits(wall_timeout_s=30, cpu_seconds=5, memory_bytes=512 * 1024 * 1024, output_bytes=4096)


def _result(
    *, exit_code: int = 0, termination: Termination = Termination.EXITED, stderr: bytes = b"", **extra: Any
) -> SandboxResult:
    fields: dict[str, Any] = {
        "exit_code": exit_code,
        "stdout": b"",
        "stderr": stderr,
        "stdout_truncated": False,
        "stderr_truncated": False,
        "wall_time_s": 1.0,
        "cpu_time_s": 0.5,
        "max_rss_kib": 40_000,
        "termination": termination,
        **extra,
    }
    return SandboxResult(**fields)


@pytest.fixture
def idle_server() -> Iterator[RpcServer]:
    host_end, runner_end = socket.socketpair()
    server = RpcServer(host_end, _Worker(torch.nn.Identity()), {"ok": True})
    yield server
    host_end.close()
    runner_end.close()


SIGKILLED = 128 + signal.SIGKILL


@pytest.mark.parametrize(
    ("result", "server_state", "code", "phrase"),
    [
        (_result(exit_code=SIGKILLED, termination=Termination.TIMEOUT), {}, "timeout", "wall-clock limit of 30 s"),
        (
            _result(exit_code=SIGKILLED, termination=Termination.CPU_LIMIT, cpu_time_s=5.04),
            {},
            "cpu_limit",
            "CPU limit of 5 s (all its processes together, 5.04 s counted)",
        ),
        (
            _result(exit_code=SIGKILLED, termination=Termination.MEMORY_LIMIT, oom_killed=True),
            {},
            "memory_limit",
            "out-of-memory killer",
        ),
        # RLIMIT_AS: an allocation fails, and code that does not check it dies of a signal.
        (
            _result(exit_code=128 + signal.SIGABRT, stderr=b"terminate called after throwing std::bad_alloc\n"),
            {},
            "memory_limit",
            "died of SIGABRT: an allocation failed just before",
        ),
        (
            _result(exit_code=128 + signal.SIGSEGV, max_rss_kib=500 * 1024),
            {},
            "memory_limit",
            "resident memory had reached 500 MiB",
        ),
        (_result(exit_code=SIGKILLED), {}, "killed", "by none of the job's limits"),
        (_result(exit_code=SIGKILLED, host_oom_kills=1), {}, "killed", "out-of-memory killer was active on the host"),
        (_result(exit_code=128 + signal.SIGSEGV), {}, "killed", "died of SIGSEGV"),
        (_result(exit_code=3), {"host_failure": "KeyError: 'x'"}, "host_error", "the host failed while answering"),
        (
            _result(exit_code=3),
            {"reply_error": ("the host could not send a reply to the runner: boom", "reply_error")},
            "reply_error",
            "could not send a reply",
        ),
        (
            _result(exit_code=3),
            {"host_time_spent": ("the job's host model time of 5 s ran out during this call", "host_time_limit")},
            "host_time_limit",
            "ran out during this call",
        ),
        (_result(exit_code=0), {"protocol_error": "malformed message"}, "protocol_error", "broke the RPC protocol"),
        (_result(exit_code=4, stderr=b"MemoryError\n"), {}, "memory_limit", "ran out of memory (limit 512 MiB)"),
    ],
)
def test_each_cause_is_named(
    idle_server: RpcServer, result: SandboxResult, server_state: dict[str, Any], code: str, phrase: str
) -> None:
    for name, value in server_state.items():
        setattr(idle_server, name, value)
    error = run._diagnose(result, idle_server, LIMITS, 1 << 20)
    assert error is not None and error.code == code, error
    assert phrase in error.message
    if code != "memory_limit":
        assert "memory limit" not in error.message


def test_a_host_failure_after_a_delivered_result_does_not_fail_the_job(idle_server: RpcServer) -> None:
    idle_server.has_result, idle_server.result, idle_server.host_failure = True, {}, "KeyError: 'x'"
    assert run._diagnose(_result(exit_code=0), idle_server, LIMITS, 1 << 20) is None


# ------------------------------------------------------------------------------ real runners


@needs_bwrap
def test_forked_spinners_hit_the_cpu_limit_of_the_whole_tree(run_code: Callable[..., RunOutcome]) -> None:
    code = """
        import os
        def main():
            for _ in range(6):
                if os.fork() == 0:
                    while True:
                        pass
            os.wait()
        """
    outcome = run_code(textwrap.dedent(code), cpu_seconds=2, wall_seconds=60)
    assert outcome.error is not None and outcome.error.code == "cpu_limit", outcome.error
    assert "CPU limit of 2 s (all its processes together" in outcome.error.message
    assert outcome.usage["termination"] == "cpu_limit" and outcome.usage["cpu_accounting"] in ("cgroup", "proc")
    # Six processes never ran six times the limit: the tree was killed past it by what they burn
    # while the watcher waits for a CPU (about a second of two loaded CI cores once), hence 2 x.
    assert 1.9 <= outcome.usage["cpu_seconds"] < 2 * 2
    assert outcome.usage["wall_seconds"] < 20


@needs_bwrap
@pytest.mark.parametrize(
    "body",
    [
        "os.kill(os.getpid(), signal.SIGKILL)",  # the runner kills itself
        "os.kill(1, signal.SIGTERM)",  # or asks the sandbox's init to end everything
    ],
)
def test_a_kill_from_inside_is_not_blamed_on_memory(run_code: Callable[..., RunOutcome], body: str) -> None:
    # The host holds more than the runner's memory limit (as a gateway holding weights does): bwrap,
    # forked from it, starts with that resident set, which must not read as the runner's.
    ballast = b"\x01" * (1200 * 1024 * 1024)
    outcome = run_code(f"import os, signal, time\ndef main():\n    {body}\n    time.sleep(30)\n", wall_seconds=20)
    del ballast
    assert outcome.error is not None and outcome.error.code == "killed", outcome.error
    assert "SIGKILL, but by none of the job's limits" in outcome.error.message
    assert "memory limit" not in outcome.error.message
