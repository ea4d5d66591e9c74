"""Readiness of a gateway process: which start-up steps are done, for ``/readyz`` and the start-up log."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

__all__ = ["Readiness"]


@dataclass
class _Step:
    name: str
    started: float
    finished: float | None = None
    error: str | None = None


@dataclass
class Readiness:
    """Start-up steps in order; the process is ready once every step begun has finished without error."""

    _steps: dict[str, _Step] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _opened: bool = False

    def begin(self, name: str) -> None:
        """Note that step ``name`` (say ``weights smollm2-135m``) has started."""
        with self._lock:
            self._steps[name] = _Step(name, time.monotonic())

    def finish(self, name: str, error: str | None = None) -> None:
        """Note that step ``name`` has finished (with ``error`` when it failed, which keeps the process unready)."""
        with self._lock:
            step = self._steps.setdefault(name, _Step(name, time.monotonic()))
            step.finished, step.error = time.monotonic(), error

    def open(self) -> None:
        """Declare that every step has been begun: readiness may now turn true."""
        with self._lock:
            self._opened = True

    @property
    def ready(self) -> bool:
        """Return whether start-up is complete and no step failed."""
        with self._lock:
            return self._opened and all(s.finished is not None and s.error is None for s in self._steps.values())

    def report(self) -> dict[str, object]:
        """Return ``{ready, steps: [{name, state, seconds, error}]}`` (no secrets: step names and timings)."""
        now = time.monotonic()
        with self._lock:
            steps = [
                {
                    "name": s.name,
                    "state": "failed" if s.error else ("done" if s.finished is not None else "running"),
                    "seconds": round((s.finished or now) - s.started, 3),
                    **({"error": s.error} if s.error else {}),
                }
                for s in self._steps.values()
            ]
            ready = self._opened and all(s["state"] == "done" for s in steps)
        return {"ready": ready, "steps": steps}
