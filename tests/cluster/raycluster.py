"""A real Ray cluster on this machine for the tests: a head and worker nodes started with ``ray start``.

Each node is a separate ``ray start`` (its own raylet and object store) in one temporary directory;
every process the cluster started is found by that directory in its command line, so the tests
kill exactly their own processes (a node's raylet and the workers under it, or all at the end).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
# Fast failure detection: a killed node is declared dead in about a second, not after 30 s.
FAST_HEALTH = {
    "RAY_health_check_initial_delay_ms": "0",
    "RAY_health_check_period_ms": "300",
    "RAY_health_check_timeout_ms": "300",
    "RAY_health_check_failure_threshold": "3",
}


def free_port() -> int:
    """Return a TCP port free right now on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(entry.name))
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(_children(p))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class RayCluster:
    """A head (GCS only, no weights) plus worker nodes, each with the resources it was given."""

    root: Path
    port: int
    nodes: dict[str, int] = field(default_factory=dict)  # name -> node manager port
    # The environment the cluster was started in, for every node, also one added later: a test's own
    # fixtures (a per-test AIRLOCK_HOME) must not leak into a node's workers.
    environment: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    @property
    def address(self) -> str:
        """The GCS address to join."""
        return f"127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        return {**self.environment, **FAST_HEALTH, "RAY_USAGE_STATS_ENABLED": "0"}

    def _start(self, args: list[str]) -> None:
        subprocess.run([RAY, "start", *args], env=self._env(), check=True, capture_output=True, timeout=300)

    def start_head(self) -> None:
        """Start the head: the GCS and a raylet with no CPU for work, so nothing is placed there."""
        self._start(
            [
                "--head",
                f"--port={self.port}",
                f"--temp-dir={self.root}",
                "--num-cpus=0",
                "--include-dashboard=false",
                "--disable-usage-stats",
                "--node-ip-address=127.0.0.1",
            ]
        )

    def add_node(self, name: str, resources: dict[str, float], num_cpus: int = 2) -> None:
        """Start a worker node holding ``resources`` (e.g. ``{"weights-tiny-random": 1}``)."""
        port = free_port()
        self._start(
            [
                f"--address={self.address}",
                f"--num-cpus={num_cpus}",
                f"--resources={json.dumps(resources)}",
                f"--node-manager-port={port}",
                "--node-ip-address=127.0.0.1",
                "--disable-usage-stats",
            ]
        )
        self.nodes[name] = port

    def raylet_pid(self, name: str) -> int:
        """Return the pid of node ``name``'s raylet."""
        flag = f"--node_manager_port={self.nodes[name]}"
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and "raylet" in _cmdline(int(entry.name)) and flag in _cmdline(int(entry.name)):
                return int(entry.name)
        raise LookupError(f"no raylet for node {name}")

    def kill_node(self, name: str) -> None:
        """kill -9 node ``name``: its raylet and every process under it (its workers and agents)."""
        for pid in _tree(self.raylet_pid(name)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def node_of_pid(self, pid: int) -> str | None:
        """Return the name of the node whose raylet is an ancestor of ``pid``."""
        for name in self.nodes:
            try:
                if pid in _tree(self.raylet_pid(name)):
                    return name
            except LookupError:
                continue
        return None

    def stop(self) -> None:
        """Kill every process this cluster started (found by its temporary directory), then remove it."""
        marker = str(self.root)
        session_pids = [
            int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and marker in _cmdline(int(e.name))
        ]
        for pid in session_pids:
            for p in _tree(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        time.sleep(0.2)
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(nodes: dict[str, dict[str, float]]) -> RayCluster:
    """Start a head and one worker node per entry of ``nodes`` (name -> custom resources)."""
    # Short path: Ray's sockets live under it, and a Unix socket path has ~100 characters at most.
    root = Path(tempfile.mkdtemp(prefix="alray-", dir="/tmp"))
    cluster = RayCluster(root=root, port=free_port())
    try:
        cluster.start_head()
        for name, resources in nodes.items():
            cluster.add_node(name, resources)
    except BaseException:
        cluster.stop()
        raise
    return cluster
