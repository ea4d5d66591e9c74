"""The sandbox-escape corpus: each job really tries to get out and must end contained, with a clear error."""

from __future__ import annotations

import os
import socket
import textwrap
from pathlib import Path

import numpy as np
import pytest

from airlock.config import get_settings
from airlock.interp import _runtime
from airlock.interp.errors import InterpJobError
from airlock.interp.leak_index import param_index
from airlock.interp.output_policy import OutputPolicy, apply_policy
from airlock.interp.workers import ThreadWorker
from tests.conftest import needs_bwrap

pytestmark = needs_bwrap


@pytest.fixture
def run_code(run_pooled):
    """Every escape attempt runs in a warm runner from a pool: the path the gateway's jobs take."""
    return run_pooled


def _code(body: str) -> str:
    return textwrap.dedent(body)


def test_reading_the_data_dir_and_weights_fails(run_code, airlock_env: Path) -> None:
    settings = get_settings()
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    secret = settings.home_dir / "secret.txt"
    secret.write_text("LAB-SECRET")
    targets = [str(secret), str(settings.model_cache_dir), "/proc/1/root/" + str(secret), "/etc/shadow"]
    outcome = run_code(
        _code(
            """
            import os
            def main(paths):
                seen = {}
                for path in paths:
                    try:
                        if os.path.isdir(path):
                            seen[path] = os.listdir(path)
                        else:
                            seen[path] = open(path).read()
                    except OSError as exc:
                        seen[path] = type(exc).__name__
                leaked = {p: v for p, v in seen.items() if not isinstance(v, str) or "Error" not in v}
                if leaked:
                    return {"leaked": leaked}
                raise PermissionError(f"nothing readable: {seen}")
            """
        ),
        args={"paths": targets},
    )
    assert outcome.value is None
    assert outcome.error is not None and outcome.error.code == "code_error"
    assert "PermissionError: nothing readable" in outcome.error.message
    assert "LAB-SECRET" not in outcome.logs


def test_network_is_unreachable(run_code) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        outcome = run_code(
            _code(
                """
                import socket
                def main(port):
                    errors = []
                    for address in [("127.0.0.1", port), ("1.1.1.1", 53), ("10.0.0.1", 80)]:
                        try:
                            socket.create_connection(address, timeout=2).close()
                            return {"connected": list(address)}
                        except OSError as exc:
                            errors.append(f"{address[0]}: {exc}")
                    raise ConnectionError("; ".join(errors))
                """
            ),
            args={"port": port},
        )
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing from the sandbox reached the host's loopback
    finally:
        listener.close()
    assert outcome.error is not None and outcome.error.code == "code_error"
    assert "ConnectionError" in outcome.error.message and "unreachable" in outcome.error.message


def test_writing_outside_tmp_fails_and_tmp_is_private(run_code, tmp_path: Path) -> None:
    outside = tmp_path / "planted"
    outcome = run_code(
        _code(
            """
            import os
            def main(paths):
                open("/tmp/scratch", "w").write("ok")  # the one writable place
                errors = []
                for path in paths:
                    try:
                        with open(path, "w") as handle:
                            handle.write("pwned")
                        return {"wrote": path}
                    except OSError as exc:
                        errors.append(f"{path}: {exc.strerror}")
                raise PermissionError("; ".join(errors))
            """
        ),
        args={"paths": [str(outside), "/opt/airlock/site/airlock/interp/client.py", "/usr/lib/x", "/x"]},
    )
    assert outcome.error is not None and outcome.error.code == "code_error"
    assert "Read-only file system" in outcome.error.message or "No such file" in outcome.error.message
    assert not outside.exists()
    runtime_client = _runtime.ensure_runtime().root / "site" / "airlock" / "interp" / "client.py"
    assert b"pwned" not in runtime_client.read_bytes()


def test_fork_bomb_is_contained(run_code) -> None:
    outcome = run_code(
        _code(
            """
            import os
            def main():
                children = 0
                while True:
                    pid = os.fork()
                    if pid == 0:
                        os.execv("/bin/sleep", ["sleep", "60"])  # hold a process slot
                    children += 1
            """
        ),
        wall_seconds=30,
    )
    assert outcome.error is not None and outcome.error.code == "code_error"
    assert "BlockingIOError" in outcome.error.message and "Resource temporarily unavailable" in outcome.error.message
    assert outcome.usage["wall_seconds"] < 25  # ended by the process limit, not the clock


def test_memory_bomb_is_contained(run_code) -> None:
    outcome = run_code("def main():\n    hog = bytearray(8 * 1024 ** 3)\n    return {'n': len(hog)}\n", memory_mb=512)
    assert outcome.error is not None and outcome.error.code == "memory_limit"
    assert "ran out of memory (limit 512 MiB)" in outcome.error.message


def test_infinite_loop_hits_the_cpu_limit(run_code) -> None:
    outcome = run_code("def main():\n    while True:\n        pass\n", cpu_seconds=1, wall_seconds=20)
    assert outcome.error is not None and outcome.error.code == "cpu_limit"
    assert "CPU limit of 1 s" in outcome.error.message


def test_sleeping_forever_hits_the_wall_clock(run_code) -> None:
    outcome = run_code("import time\ndef main():\n    time.sleep(600)\n", wall_seconds=2)
    assert outcome.error is not None and outcome.error.code == "timeout"
    assert "wall-clock limit of 2 s" in outcome.error.message


def test_huge_logs_are_cut(run_code) -> None:
    outcome = run_code("def main():\n    while True:\n        print('x' * 65536)\n", log_bytes=100_000)
    assert outcome.error is not None and outcome.error.code == "log_limit"
    assert len(outcome.logs) <= 2 * 100_000


def test_huge_result_is_refused(run_code) -> None:
    outcome = run_code(
        "import numpy as np\ndef main():\n    return {'big': np.ones(1_000_000, dtype=np.float32)}\n",
        max_result_bytes=8_000_000,
    )
    assert outcome.error is None and outcome.value is not None
    policy = OutputPolicy(max_result_bytes=100_000, grant_bytes_left=None, review_over_bytes=1 << 20)
    with pytest.raises(InterpJobError, match="per-job cap is 100000 bytes") as caught:
        apply_policy(outcome.value, policy, None)
    assert caught.value.code == "result_too_large"


def test_result_frames_past_the_cap_are_not_even_read(run_code) -> None:
    outcome = run_code(
        "import numpy as np\ndef main():\n    return {'big': np.ones(20_000_000, dtype=np.float32)}\n",
        max_result_bytes=1_000_000,
    )
    assert outcome.value is None
    assert outcome.error is not None and outcome.error.code == "result_too_large"
    assert outcome.usage["rpc"]["bytes_in"] < 1_000_000


@pytest.mark.parametrize("module", ["torch", "transformers", "airlock.app", "airlock.backends.weights", "requests"])
def test_modules_beyond_the_runtime_are_absent(run_code, module: str) -> None:
    outcome = run_code(f"def main():\n    import {module}\n    return {{}}\n")
    assert outcome.error is not None and outcome.error.code == "code_error"
    assert "ModuleNotFoundError" in outcome.error.message and module.split(".")[0] in outcome.error.message


def test_private_rpc_verbs_are_refused_even_when_caught(run_code) -> None:
    outcome = run_code(
        _code(
            """
            from airlock.interp import client
            def main():
                refused = []
                for verb in ["parameters", "state_dict", "run_module", "gradients", "__getattr__"]:
                    try:
                        client._call(verb, name="model.embed_tokens.weight")
                    except client.RemoteError as exc:
                        refused.append(str(exc))
                return {"refused": refused}
            """
        )
    )
    assert outcome.error is not None and outcome.error.code == "rpc_refused"
    assert "'parameters'" in outcome.error.message
    assert outcome.usage["rpc"]["refused"][:2] == [
        "the RPC verb 'parameters' (allowed: generate, modules, trace)",
        "the RPC verb 'state_dict' (allowed: generate, modules, trace)",
    ]


def test_reading_parameters_as_modules_is_refused(run_code) -> None:
    outcome = run_code(
        _code(
            """
            from airlock.interp import client
            def main():
                client.trace("hi", read=["model.embed_tokens"])
            """
        )
    )
    assert outcome.error is not None and outcome.error.code == "rpc_refused"
    assert "module 'model.embed_tokens' is not readable" in outcome.error.message


def test_returning_parameter_equal_tensors_is_refused(run_code, tiny_worker: ThreadWorker) -> None:
    weight = tiny_worker.model.model.layers[1].mlp.up_proj.weight.detach().numpy()
    outcome = run_code(
        "import numpy as np\ndef main(row):\n    return {'looks_innocent': np.array(row, dtype=np.float64)}\n",
        args={"row": [float(v) for v in weight[7]]},
    )
    assert outcome.error is None and outcome.value is not None  # the runner delivered it...
    policy = OutputPolicy(max_result_bytes=1 << 20, grant_bytes_left=None, review_over_bytes=1 << 20)
    with pytest.raises(InterpJobError, match=r"withheld: array a0 contains .*up_proj\.weight") as caught:
        apply_policy(outcome.value, policy, param_index(tiny_worker))  # ...the policy stops it
    assert caught.value.code == "weights_in_result"


def test_ptrace_mount_and_namespaces_are_denied(run_code) -> None:
    outcome = run_code(
        _code(
            """
            import ctypes, os
            libc = ctypes.CDLL(None, use_errno=True)
            def attempt(name, result):
                return f"{name}: {os.strerror(ctypes.get_errno())}" if result != 0 else f"{name}: SUCCEEDED"
            def main():
                results = [
                    attempt("ptrace", libc.ptrace(16, 1, None, None)),  # PTRACE_ATTACH to the init
                    attempt("mount", libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
                    attempt("unshare", libc.unshare(0x10000000)),  # CLONE_NEWUSER
                    attempt("chroot", libc.chroot(b"/tmp")),
                ]
                if any("SUCCEEDED" in r for r in results):
                    return {"escaped": results}
                raise PermissionError("; ".join(results))
            """
        )
    )
    assert outcome.error is not None and outcome.error.code == "code_error", outcome
    assert "ptrace: Operation not permitted" in outcome.error.message
    for call in ("mount", "unshare", "chroot"):
        assert f"{call}: " in outcome.error.message and f"{call}: SUCCEEDED" not in outcome.error.message


def test_host_is_unharmed_after_the_corpus(run_code) -> None:
    # A normal job still works after the escapes: no state leaks from one runner to the next.
    outcome = run_code(
        _code(
            """
            import os
            from airlock.interp import client
            def main():
                return {"tmp": os.listdir("/tmp"), "uid": os.getuid(), "layers": client.model_info()["n_layers"]}
            """
        )
    )
    assert outcome.error is None, outcome.logs
    assert outcome.value == {"tmp": [], "uid": 1000, "layers": 2}
    assert os.getpid() > 0 and np.isfinite(outcome.usage["cpu_seconds"])


def test_host_model_time_is_capped_too(run_code) -> None:
    # Forward passes run on the host, outside the sandbox's CPU limit: the job's CPU budget caps them as well,
    # inside the call that crosses it.
    outcome = run_code(
        _code(
            """
            from airlock.interp import client
            def main():
                while True:
                    client.generate(["tell me a long story"] * 4, max_tokens=256, chat=False)
            """
        ),
        cpu_seconds=1,
        wall_seconds=60,
    )
    assert outcome.error is not None and outcome.error.code == "host_time_limit"
    assert "host model time of 1 s ran out during this call" in outcome.error.message
    # Counted as the call runs: stopped inside the forward pass, not after the call that crossed the limit.
    assert 0.9 < outcome.usage["rpc"]["model_seconds"] < 2.0
