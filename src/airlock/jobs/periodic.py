"""A background thread that runs one pass of some upkeep every few seconds (sequencing, publishing)."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class PeriodicWorker:
    """Calls :meth:`run_once` every ``interval_s`` seconds on a daemon thread until stopped.

    A failing pass is logged and the next one retries, so upkeep never takes the gateway down.
    """

    name = "periodic-worker"

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> object:
        """Do one pass of the work (subclasses)."""
        raise NotImplementedError

    def start(self) -> None:
        """Start the thread (idempotent)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop and wait for a pass in progress."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception:
                log.exception("%s: pass failed; the next one retries", self.name)
