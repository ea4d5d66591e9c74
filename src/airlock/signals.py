"""Cross-process wake-ups: a committed change tells every process on the database at once.

A writer calls :func:`emit` inside its transaction; when (and only if) that transaction
commits, every subscriber of the channel is called: in the writer's own process at once, in other
processes through PostgreSQL ``NOTIFY`` (delivered on commit to every replica that ``LISTEN``)
or, on SQLite, through a small file beside the database that each process watches (with inotify,
so an idle process spends nothing; by polling where inotify is unavailable). Subscribers
must be quick and thread-safe (clear a cache, set an ``Event``): they run on the committing thread
or on the listener thread. A signal says *something changed*, never what: receivers re-read the
database, so a lost or doubled signal costs a re-read, never correctness (and after a reconnect
every channel is signalled, since notifications may have been missed meanwhile).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import socket
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

_PENDING = "airlock.signals"
_CHANNEL_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_BY_ENGINE: weakref.WeakKeyDictionary[Engine, Signals] = weakref.WeakKeyDictionary()


def emit(session: Session, channel: str) -> None:
    """Signal ``channel`` when ``session``'s transaction commits (nothing happens if it rolls back)."""
    _check(channel)
    session.info.setdefault(_PENDING, set()).add(channel)
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        # NOTIFY is transactional: PostgreSQL delivers it on commit, to every listening connection.
        session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": channel})


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    channels: set[str] | None = session.info.pop(_PENDING, None)
    if not channels:
        return
    bind = session.get_bind()
    signals = _BY_ENGINE.get(bind) if isinstance(bind, Engine) else None
    if signals is not None:
        signals.committed(channels)


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(_PENDING, None)


class Signals:
    """Channels of one database: ``emit`` in a transaction, ``subscribe`` to hear about commits."""

    def __init__(self, url: str, engine: Engine, *, poll_interval_s: float = 0.01) -> None:
        self._postgres = url.startswith("postgresql")
        self._conninfo = url.replace("postgresql+psycopg://", "postgresql://", 1)
        self._dir: Path | None = None
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                self._dir = Path(path + "-signals")
        self._poll_interval = poll_interval_s
        self._subscribers: dict[str, list[Callable[[], None]]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._listening: set[str] = set()
        self._wake: socket.socket | None = None
        """The write end of the file watcher's wake-up pair (a new channel to watch, or stop)."""
        _BY_ENGINE[engine] = self

    # ---------------------------------------------------------------- sending

    def committed(self, channels: set[str]) -> None:
        """Tell this process's subscribers, and the other processes, that ``channels`` were signalled."""
        for channel in sorted(channels):
            if self._dir is not None:
                self._touch(channel)
            self._dispatch(channel)

    def _touch(self, channel: str) -> None:
        assert self._dir is not None
        try:
            self._dir.mkdir(exist_ok=True)
            # Any new content is a change: random bytes need no lock between concurrent writers.
            fd = os.open(self._dir / channel, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.pwrite(fd, os.urandom(16), 0)
            finally:
                os.close(fd)
        except OSError:  # the data dir is read-only, say: the other processes fall back to polling
            log.exception("could not signal %s to other processes", channel)

    # ---------------------------------------------------------------- receiving

    def subscribe(self, channel: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` after every commit that signals ``channel``; return a function that unsubscribes."""
        _check(channel)
        with self._lock:
            self._subscribers.setdefault(channel, []).append(callback)
            start = self._thread is None and (self._postgres or self._dir is not None)
            if start:
                self._stop.clear()
                self._thread = threading.Thread(target=self._listen, name="airlock-signals", daemon=True)
                self._thread.start()
        if not start:
            self._poke()  # the file watcher reads the new channel's content before it next waits

        def unsubscribe() -> None:
            with self._lock:
                callbacks = self._subscribers.get(channel, [])
                if callback in callbacks:
                    callbacks.remove(callback)

        return unsubscribe

    def close(self) -> None:
        """Stop listening (the thread ends within a poll interval, or a second on PostgreSQL)."""
        self._stop.set()
        self._poke()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _channels(self) -> list[str]:
        with self._lock:
            return [channel for channel, callbacks in self._subscribers.items() if callbacks]

    def _dispatch(self, channel: str) -> None:
        with self._lock:
            callbacks = list(self._subscribers.get(channel, ()))
        for callback in callbacks:
            try:
                callback()
            except Exception:  # one broken subscriber must not starve the others
                log.exception("signal subscriber of %s failed", channel)

    def _dispatch_all(self) -> None:
        for channel in self._channels():
            self._dispatch(channel)

    def _listen(self) -> None:
        if self._postgres:
            self._listen_postgres()
        else:
            self._watch_files()

    def _listen_postgres(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as conn:
                    self._listening = set()
                    self._subscribe_new(conn)
                    # Notifications sent while we were not listening are lost: treat them as sent.
                    self._dispatch_all()
                    while not self._stop.is_set():
                        for notice in conn.notifies(timeout=1.0):
                            self._dispatch(notice.channel)
                            if self._stop.is_set():
                                break
                        self._subscribe_new(conn)
            except Exception:
                if self._stop.is_set():
                    return
                log.warning("signal listener lost its PostgreSQL connection; reconnecting", exc_info=True)
                self._stop.wait(1.0)

    def _subscribe_new(self, conn: Any) -> None:
        for channel in self._channels():
            if channel not in self._listening:
                conn.execute(f'LISTEN "{channel}"')
                self._listening.add(channel)

    def _poke(self) -> None:
        """Wake the file watcher from its wait (a closed pair is ignored: the watcher has ended)."""
        with self._lock:
            wake = self._wake
        if wake is not None:
            with contextlib.suppress(OSError):
                wake.send(b"\0")

    def _watch_files(self) -> None:
        assert self._dir is not None
        seen: dict[str, bytes | None] = {}
        notify = self._inotify(self._dir)
        if notify is None:
            log.info("watching %s by polling every %g s (no inotify)", self._dir, self._poll_interval)
            while True:
                self._read_channels(seen)
                if self._stop.wait(self._poll_interval):
                    return
        wake_read, wake_write = socket.socketpair()
        with self._lock:
            self._wake = wake_write
        try:
            with notify:
                while not self._stop.is_set():
                    # Read every channel after each wake-up, and once before the first wait: a
                    # channel's first content is its baseline, and a change between two reads is
                    # signalled by the second (an event only says that one happened).
                    self._read_channels(seen)
                    readable, _, _ = select.select([notify, wake_read], [], [])
                    if notify in readable:
                        notify.read(timeout=0)  # drain: which file changed is re-read above
                    if wake_read in readable:
                        wake_read.recv(4096)
        finally:
            with self._lock:
                self._wake = None
            wake_write.close()
            wake_read.close()

    def _inotify(self, directory: Path) -> Any:
        """Return an inotify watch on ``directory`` (created if missing), or None where inotify is unavailable."""
        try:
            from inotify_simple import INotify, flags
        except ImportError:  # not Linux, or the server extra is not installed
            return None
        notify = None
        try:
            directory.mkdir(exist_ok=True)
            notify = INotify()
            notify.add_watch(str(directory), flags.MODIFY | flags.CREATE | flags.MOVED_TO)
        except OSError:  # a read-only data dir, or the inotify watch limit reached
            log.warning("cannot watch %s with inotify; polling instead", directory, exc_info=True)
            if notify is not None:
                notify.close()
            return None
        return notify

    def _read_channels(self, seen: dict[str, bytes | None]) -> None:
        """Dispatch each channel whose file changed since the last read (a new channel's first read is its baseline)."""
        assert self._dir is not None
        for channel in self._channels():
            try:
                with open(self._dir / channel, "rb") as fh:
                    content: bytes | None = fh.read(16)
            except FileNotFoundError:
                content = None
            except OSError:
                continue
            if channel not in seen:
                seen[channel] = content
            elif seen[channel] != content:
                seen[channel] = content
                self._dispatch(channel)


def _check(channel: str) -> None:
    if not _CHANNEL_RE.match(channel):
        raise ValueError(f"signal channel {channel!r} must be a lowercase identifier")
