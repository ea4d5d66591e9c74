"""Cross-process signals on SQLite: inotify wakes other processes at once, and an idle watcher reads nothing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from airlock.db import Database
from airlock.signals import Signals, emit

CHANNEL = "test_channel"
NEVER_S = 3600.0
"""A poll interval no test waits out: a signal that arrives came through inotify."""


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'airlock.db'}"


@pytest.fixture
def sender(url: str) -> Iterator[Database]:
    """Another engine on the same database: it stands for another process."""
    db = Database(url)
    yield db
    db.dispose()


def _listener(url: str, **kwargs: float) -> Signals:
    return Signals(url, create_engine(url), **kwargs)


def _signal(db: Database, channel: str = CHANNEL) -> None:
    with db.session() as session:
        session.execute(text("SELECT 1"))
        emit(session, channel)


def _subscribed(signals: Signals, channel: str = CHANNEL) -> threading.Event:
    heard = threading.Event()
    signals.subscribe(channel, heard.set)
    return heard


def _watching(signals: Signals, calls: list[int]) -> None:
    """Count the watcher's reads of the channel files, and return once it has made its first."""
    first = threading.Event()
    read = signals._read_channels

    def counted(seen: dict[str, bytes | None]) -> None:
        read(seen)
        calls.append(1)
        first.set()

    signals._read_channels = counted  # type: ignore[method-assign]
    assert first.wait(10), "the watcher never read the channels"


def test_another_process_hears_a_commit_through_inotify(url: str, sender: Database) -> None:
    listener = _listener(url, poll_interval_s=NEVER_S)
    reads: list[int] = []
    try:
        heard = _subscribed(listener)
        _watching(listener, reads)
        _signal(sender)
        assert heard.wait(10), "the signal did not arrive, and polling is off"
    finally:
        listener.close()


def test_an_idle_watcher_reads_nothing(url: str, sender: Database) -> None:
    listener = _listener(url, poll_interval_s=0.001)  # would read hundreds of times if it polled
    reads: list[int] = []
    try:
        _subscribed(listener)
        _watching(listener, reads)
        waited = threading.Event()
        waited.wait(0.3)
        assert len(reads) == 1
    finally:
        listener.close()


def test_a_channel_subscribed_later_is_watched(url: str, sender: Database) -> None:
    listener = _listener(url, poll_interval_s=NEVER_S)
    reads: list[int] = []
    try:
        _subscribed(listener, "first_channel")
        _watching(listener, reads)
        later = _subscribed(listener, "later_channel")
        # Its baseline is read on the poke that the subscription sends, before the signal below.
        for _ in range(1000):
            if len(reads) >= 2:
                break
            threading.Event().wait(0.01)
        _signal(sender, "later_channel")
        assert later.wait(10)
    finally:
        listener.close()


def test_without_inotify_the_watcher_polls(url: str, sender: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Signals, "_inotify", lambda self, directory: None)
    listener = _listener(url, poll_interval_s=0.01)
    reads: list[int] = []
    try:
        heard = _subscribed(listener)
        _watching(listener, reads)
        _signal(sender)
        assert heard.wait(10)
    finally:
        listener.close()


@pytest.mark.parametrize("inotify", [True, False])
def test_close_ends_the_watcher(url: str, inotify: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not inotify:
        monkeypatch.setattr(Signals, "_inotify", lambda self, directory: None)
    listener = _listener(url, poll_interval_s=0.01)
    reads: list[int] = []
    _subscribed(listener)
    _watching(listener, reads)
    thread = listener._thread
    assert thread is not None
    listener.close()
    assert not thread.is_alive()
