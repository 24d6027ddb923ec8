"""The store contract on SQLite."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from contract import StoreContract
from storehelpers import make_factory


class TestSQLiteStore(StoreContract):
    @pytest.fixture
    def make_store(self, sqlite_db):
        yield from make_factory(sqlite_db)


def test_reads_run_beside_a_held_write_lock_and_writes_wait_for_it(sqlite_db, tmp_path):
    """Reads begin with a plain BEGIN, writes with BEGIN IMMEDIATE: while another
    connection holds the write lock, a read answers at once (also right after the
    store's connection served a read that never began) and a write waits."""
    import sqlite3
    import threading

    from contract import msg

    factory = make_factory(sqlite_db)
    store = next(factory)()
    store.publish([msg("before")])
    holder = sqlite3.connect(str(tmp_path / "events.db"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with store.db.engine.connect() as conn, store.db.dialect.reading(conn):
            pass  # a read that never began: its pooled connection must not stay a reader's
        assert store.queue_size("q") == 1
        assert store.schema_version() > 0
        done = threading.Event()
        writer = threading.Thread(target=lambda: (store.publish([msg("after")]), done.set()))
        writer.start()
        assert not done.wait(0.5), "a write must wait for the write lock"
    finally:
        holder.execute("COMMIT")
        holder.close()
    writer.join(10)
    assert done.is_set()
    assert store.queue_size("q") == 2
    next(factory, None)  # closes the store


def test_a_claim_with_nothing_due_does_not_wait_for_the_write_lock(sqlite_db, tmp_path, clock):
    """Every commit wakes SQLite's consumers, and a claim that finds nothing must
    not queue for the one write lock behind a publisher (it looks first, as a
    read); one that finds a message takes the lock and waits for it."""
    import sqlite3
    import threading

    from contract import msg

    factory = make_factory(sqlite_db)
    store = next(factory)(clock=clock)
    store.publish([msg("later", not_before=clock.now + 60)])
    holder = sqlite3.connect(str(tmp_path / "events.db"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        done: list[object] = []
        idle = threading.Thread(
            target=lambda: done.append(store.claim_round([], ["q"], 4, "w", 30, next_due=True))
        )
        idle.start()
        idle.join(5)
        assert done, "an empty claim waited for the write lock"
        (empty,) = done
        assert empty.claimed == [] and empty.next_due == clock.now + 60
        clock.advance(61)
        claimed: list[object] = []
        busy = threading.Thread(target=lambda: claimed.append(store.claim(["q"], 4, "w", 30)))
        busy.start()
        busy.join(0.5)
        assert not claimed, "a claim that writes must wait for the write lock"
    finally:
        holder.execute("COMMIT")
        holder.close()
    busy.join(10)
    assert [m.stream for m in claimed[0]] == ["later"]
    next(factory, None)


@pytest.mark.parametrize("commits", [3, 100])
def test_the_wal_is_checkpointed_by_a_thread_of_the_store_not_by_committers(
    sqlite_db, commits
):
    """A committing caller never copies the WAL back (SQLite's own checkpoint is
    pushed back to a backstop): the store's thread does, after a run of commits
    or once they stop."""
    from contract import msg

    from celery_eventstore.storage.dialects import sqlite as sqlite_dialect

    factory = make_factory(sqlite_db)
    store = next(factory)()
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == (
            sqlite_dialect.BACKSTOP_CHECKPOINT_PAGES
        )
    checkpointer = store.db.dialect._checkpointer
    assert checkpointer is not None
    before = checkpointer.last  # the migration's commits may have had one
    for i in range(commits):
        store.publish([msg(f"task-{i}")])
    deadline = time.monotonic() + 3 * sqlite_dialect.CHECKPOINT_IDLE_SECONDS
    while checkpointer.last is before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert checkpointer.last is not before, "no checkpoint came"
    _, frames, copied = checkpointer.last
    assert frames > 0 and copied > 0
    assert checkpointer._thread is not threading.current_thread()


def test_a_consumer_keeps_the_states_of_its_claims_bounded_and_forgets_settled_ones(
    sqlite_db, monkeypatch
):
    from contract import msg

    from celery_eventstore.storage import deliveries

    monkeypatch.setattr(deliveries, "MOST_HELD_STATES", 3)
    factory = make_factory(sqlite_db)
    store = next(factory)()
    store.publish([msg(f"task-{i}") for i in range(5)])
    claimed = store.claim_round([], ["q"], 5, "w", 300).claimed
    assert len(claimed) == 5
    held = store.deliveries._held
    assert list(held) == [m.claim for m in claimed[2:]]  # the newest three
    done = store.claim_round([m.ref for m in claimed], ["q"], 5, "w", 300)
    assert set(done.outcomes.values()) == {"done"}
    assert held == {}


def test_the_checkpoint_thread_never_recreates_a_database_removed_under_it(
    tmp_path, monkeypatch
):
    """A store left open on a file someone removed (a temporary directory
    cleaned up): its thread's idle checkpoint fails quietly and creates nothing."""
    from contract import msg

    from celery_eventstore.storage import EventStore
    from celery_eventstore.storage.dialects import sqlite as sqlite_dialect

    errors: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    path = tmp_path / "gone.db"
    store = EventStore(f"sqlite:///{path}", auto_migrate=True)
    store.publish([msg("a")])  # starts the thread; its idle checkpoint is due
    for leftover in tmp_path.iterdir():
        leftover.unlink()
    time.sleep(2 * sqlite_dialect.CHECKPOINT_IDLE_SECONDS)
    assert not path.exists()
    assert errors == []
    assert store.db.dialect._checkpointer._thread.is_alive()
    store.close()


def test_a_writer_takes_the_write_lock_once_it_is_free_and_gives_up_after_the_timeout(
    tmp_path,
):
    """``BEGIN IMMEDIATE`` with SQLite's busy handler off for its own tries: a
    writer gets the lock once the holder lets it go, gets SQLite's "database is
    locked" once the timeout has passed, and in both cases leaves the busy
    timeout of the connection's other statements as it was."""
    import sqlite3

    from celery_eventstore.storage.dialects.sqlite import BUSY_TIMEOUT_SECONDS, take_write_lock

    path = str(tmp_path / "lock.db")
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("CREATE TABLE t (n INTEGER)")
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_SECONDS * 1000)}")

    def busy_timeout() -> int:
        return int(writer.execute("PRAGMA busy_timeout").fetchone()[0])

    holder.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        take_write_lock(writer, timeout=0.3)
    assert time.monotonic() - started >= 0.3
    assert not writer.in_transaction
    assert busy_timeout() == int(BUSY_TIMEOUT_SECONDS * 1000)

    released = threading.Timer(0.2, lambda: holder.execute("COMMIT"))
    released.start()
    try:
        take_write_lock(writer, timeout=10)
        assert writer.in_transaction
        writer.execute("INSERT INTO t VALUES (1)")
        assert busy_timeout() == int(BUSY_TIMEOUT_SECONDS * 1000)
        writer.execute("COMMIT")
    finally:
        released.join()
        holder.close()
        writer.close()
