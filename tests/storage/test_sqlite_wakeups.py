"""Wake-ups on SQLite: the listener learns of another process's commit from the
kernel (inotify on the database's directory) and an event loop can watch it; the
pragma ``data_version`` still decides whether anything changed."""

from __future__ import annotations

import multiprocessing
import os
import select
import sys
import threading
import time
from pathlib import Path

import pytest

from celery_eventstore.storage import ANY_QUEUE, EventStore, NewMessage
from celery_eventstore.storage.notifiers.sqlite_data_version import FileWatch

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="inotify is Linux's"
)


def publish_one(url: str, stream: str) -> None:
    store = EventStore(url)
    try:
        store.publish([NewMessage(stream=stream, queue="q", message={"body": stream})])
    finally:
        store.close()


def readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


@pytest.fixture
def sqlite_store(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    store = EventStore(url, auto_migrate=True)
    store.migrate()
    yield store, url
    store.close()


def test_another_process_commit_makes_the_listener_readable_and_wakes_it(sqlite_store):
    store, url = sqlite_store
    listener = store.listener()
    try:
        fd = listener.fileno()
        assert fd is not None, "no file watch on a database file"
        listener.poll()  # start from quiet
        assert not readable(fd, 0.2), "readable with no commit"
        process = multiprocessing.get_context("spawn").Process(
            target=publish_one, args=(url, "from-elsewhere")
        )
        process.start()
        process.join(60)
        assert process.exitcode == 0
        assert readable(fd, 5), "another process's commit did not make the watch readable"
        assert listener.poll() == {ANY_QUEUE}
        # Drained: quiet again until the next commit.
        assert not readable(fd, 0.2)
        assert listener.poll() == set()
    finally:
        listener.close()


def test_wait_returns_with_the_commit_not_at_its_timeout(sqlite_store):
    """A waiter blocked for a minute is woken by a commit (it waits on the
    descriptor, not on a sleep)."""
    store, url = sqlite_store
    listener = store.listener()
    try:
        listener.poll()
        process = multiprocessing.get_context("spawn").Process(
            target=publish_one, args=(url, "wakes-the-waiter")
        )
        process.start()
        woken = listener.wait(60)
        process.join(60)
        assert woken == {ANY_QUEUE}
        assert [m.stream for m in store.claim(["q"], 5, "w", 30)] == ["wakes-the-waiter"]
    finally:
        listener.close()


def test_the_watch_reports_only_the_database_files(tmp_path: Path):
    watch = FileWatch(str(tmp_path / "jobs.db"))
    try:
        (tmp_path / "unrelated.txt").write_text("x")
        assert readable(watch.fd, 5)
        assert watch.drain() is False  # an event, but not about the database
        (tmp_path / "jobs.db-wal").write_bytes(b"frame")
        assert readable(watch.fd, 5)
        assert watch.drain() is True
        assert watch.drain() is False  # drained
    finally:
        watch.close()


def test_closing_the_listener_under_a_waiting_thread(sqlite_store):
    """A consumer's listener closed by one thread (the connection's close) while
    another waits on it: the waiter returns nothing at its timeout instead of
    using the closed connection, and never reads the descriptor's number once
    another open has taken it."""
    store, _ = sqlite_store
    listener = store.listener()
    assert listener.fileno() is not None
    listener.poll()
    outcome: list[object] = []

    def wait() -> None:
        try:
            outcome.append(listener.wait(0.6))
        except Exception as exc:  # noqa: BLE001 - what the test looks for
            outcome.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.15)  # in the watch's wait
    listener.close()
    read, write = os.pipe()  # likely the watch's old number
    try:
        os.write(write, b"x")
        waiter.join(5)
        assert not waiter.is_alive()
        assert outcome == [set()], outcome
        assert readable(read, 0), "the closed listener read another descriptor's data"
        assert listener.poll() == set()
    finally:
        os.close(read)
        os.close(write)
