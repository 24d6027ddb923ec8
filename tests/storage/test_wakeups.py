"""Wake-ups on PostgreSQL: one LISTEN connection per process, addressed results,
a bounded number of "ready" NOTIFYs, and a LISTEN connection that comes back by
itself (issue 11, item 2).

Connections are counted in ``pg_stat_activity`` by an ``application_name`` of the
test's own, so other tests' connections never count.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
import sqlalchemy as sa

from celery_eventstore import lifecycle as lc
from celery_eventstore.exceptions import DatabaseUnavailable
from celery_eventstore.storage import ANY_QUEUE, EventStore, NewMessage
from celery_eventstore.storage.notifiers import READY_BURST_GAP, READY_WINDOW

DRIVERS = ["psycopg2", "psycopg"]


@pytest.fixture(params=DRIVERS)
def named_store(request: pytest.FixtureRequest, postgresql_db: Any) -> Iterator[EventStore]:
    """A store whose connections carry an application_name of this test's own."""
    url, options = postgresql_db
    name = f"wakeups_{uuid.uuid4().hex[:10]}"
    named = sa.make_url(url).set(drivername=f"postgresql+{request.param}")
    store = EventStore(named.update_query_dict({"application_name": name}), **options)
    store.migrate()
    store.application_name = name  # type: ignore[attr-defined]
    yield store
    store.close()


def connections(store: EventStore, admin_url: str) -> list[tuple[str, str]]:
    """(state, last query) of every connection of ``store``'s application name."""
    engine = sa.create_engine(admin_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT state, query FROM pg_stat_activity WHERE application_name = :n"),
                {"n": store.application_name},  # type: ignore[attr-defined]
            )
            return [(str(state), str(query)) for state, query in rows]
    finally:
        engine.dispose()


def listening(rows: list[tuple[str, str]]) -> int:
    return sum(1 for _, query in rows if query.upper().startswith(("LISTEN", "UNLISTEN")))


def test_waiters_and_a_consumer_share_one_listen_connection(
    named_store: EventStore, postgresql_url: str
) -> None:
    """Eight threads waiting for eight results and a consumer waiting for its
    queue hold one LISTEN connection; each waiter wakes for its own result only."""
    store = named_store
    consumer = store.listener()
    tasks = [f"task-{n}" for n in range(8)]
    woken: dict[str, set[str]] = {}
    subscribed = threading.Barrier(len(tasks) + 1)

    def wait(task: str) -> None:
        listener = store.listener(results=[task])
        try:
            subscribed.wait(10)
            deadline = time.monotonic() + 10
            got: set[str] = set()
            while task not in got and time.monotonic() < deadline:
                got |= listener.wait(0.5)
            woken[task] = got
        finally:
            listener.close()

    threads = [threading.Thread(target=wait, args=(t,)) for t in tasks]
    for thread in threads:
        thread.start()
    subscribed.wait(10)
    rows = connections(store, postgresql_url)
    assert listening(rows) == 1, rows
    pool = store.engine.pool
    assert len(rows) <= 1 + pool.size(), rows  # type: ignore[attr-defined]
    for task in tasks:
        store.execute(task, lc.Revoke())
    for thread in threads:
        thread.join(15)
    assert woken == {t: {t} for t in tasks}, "a waiter heard another task's result"
    assert consumer.poll() == set(), "a result woke the consumer"
    store.publish([NewMessage(stream="m", queue="q", message={})])
    assert consumer.wait(5) == {"q"}
    consumer.close()
    assert listening(connections(store, postgresql_url)) == 1


def test_a_result_nobody_waits_for_wakes_no_one(named_store: EventStore) -> None:
    store = named_store
    mine, other = store.listener(results=["mine"]), store.listener(results=["other"])
    try:
        store.execute("other", lc.Revoke())
        assert other.wait(5) == {"other"}
        store.execute("unwatched", lc.Revoke())
        store.execute("mine", lc.Revoke())
        assert mine.wait(5) == {"mine"}
        assert other.wait(0.3) == set()
    finally:
        mine.close()
        other.close()


def _raw_listener(store: EventStore, admin_url: str) -> Any:
    conn = psycopg2.connect(sa.make_url(admin_url).set(drivername="postgresql").render_as_string(
        hide_password=False))
    conn.set_isolation_level(0)
    with conn.cursor() as cur:
        cur.execute(f'LISTEN "{store.channels.ready}"')
    return conn


def _drain(conn: Any, seconds: float) -> list[tuple[float, str]]:
    got: list[tuple[float, str]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        conn.poll()
        got.extend((time.monotonic(), n.payload) for n in conn.notifies)
        conn.notifies.clear()
        time.sleep(0.01)
    return got


def test_a_burst_of_publishes_sends_a_bounded_number_of_notifies(
    named_store: EventStore, postgresql_url: str
) -> None:
    """Publishing one message per transaction as fast as possible sends one NOTIFY
    per window, not one per publish -- and one after the last publish, so the
    last message is not left to the poll.  (A publish after a pause of
    READY_BURST_GAP is no burst and notifies at once: four threads publishing
    at once pause now and then, so those are counted, generously.)"""
    store = named_store
    raw = _raw_listener(store, postgresql_url)
    # A fixed number of publishes, not as many as fit in a second: a machine
    # that stalls for a second must not leave the test with one publish to judge.
    threads_, each = 4, 75
    starts: list[float] = []
    lock = threading.Lock()

    def publish() -> None:
        for _ in range(each):
            with lock:
                starts.append(time.monotonic())
            store.publish([NewMessage(stream=uuid.uuid4().hex, queue="burst", message={})])

    try:
        started = time.monotonic()
        threads = [threading.Thread(target=publish) for _ in range(threads_)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        last_publish = time.monotonic()
        publishes = threads_ * each
        got = _drain(raw, 1.0)
    finally:
        raw.close()
    elapsed = last_publish - started
    # The store's clock is read inside the publish, after this one: a pause it
    # saw can look up to a millisecond shorter here.
    pauses = sum(b - a >= READY_BURST_GAP - 0.001 for a, b in itertools.pairwise(starts))
    assert {payload for _, payload in got} == {"burst"}
    assert len(got) <= elapsed / READY_WINDOW + pauses + 2, (len(got), publishes, pauses)
    # Of the publishes that came in a burst (no pause before them), well under
    # half notified.  Not of all publishes: on a slow day the threads' publishes
    # are paced past READY_BURST_GAP, and each of those rightly notifies at once.
    assert len(got) - pauses < (publishes - pauses) / 2, (len(got), publishes, pauses)
    assert got[-1][0] >= last_publish - 0.01, "nothing told the consumers of the last publish"


def test_publishes_after_pauses_each_notify_at_once(
    named_store: EventStore, postgresql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publisher that waits between publishes (for each task's result, as
    ``delay().get()`` in a loop or a chain's next step) is no burst: each of its
    publishes notifies with its commit, none waits for the window to close
    (made a second long here, so a held one would show)."""
    store = named_store
    assert store.log.throttle is not None
    monkeypatch.setattr(store.log.throttle, "window", 1.0)
    raw = _raw_listener(store, postgresql_url)
    try:
        for _ in range(10):
            store.publish([NewMessage(stream=uuid.uuid4().hex, queue="paced", message={})])
            time.sleep(READY_BURST_GAP * 2.5)
        got = _drain(raw, 0.3)  # well before the window closes
    finally:
        raw.close()
    assert [payload for _, payload in got] == ["paced"] * 10


def test_closing_the_store_sends_the_held_wake_up_and_ends_the_sender(
    named_store: EventStore, postgresql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wake-up the window holds back goes out when the store closes, not never,
    and the thread that would have sent it ends: it kept every closed store (its
    engine, its pool) alive for the life of the process."""
    store = named_store
    assert store.log.throttle is not None
    monkeypatch.setattr(store.log.throttle, "window", 60.0)
    monkeypatch.setattr(store.log.throttle, "burst_gap", 60.0)
    raw = _raw_listener(store, postgresql_url)
    before = set(threading.enumerate())
    try:
        for _ in range(2):  # the first notifies, the second is held for the window
            store.publish([NewMessage(stream=uuid.uuid4().hex, queue="held", message={})])
        assert [payload for _, payload in _drain(raw, 0.3)] == ["held"]
        senders = [t for t in set(threading.enumerate()) - before
                   if t.name == "eventstore-ready-wakeups"]
        assert len(senders) == 1 and senders[0].is_alive()
        store.close()
        assert not senders[0].is_alive(), "the sender outlived its store"
        assert [payload for _, payload in _drain(raw, 0.3)] == ["held"]
    finally:
        raw.close()


def test_the_listen_connection_comes_back_by_itself(
    named_store: EventStore, postgresql_url: str
) -> None:
    """A LISTEN connection the server cut is made again: its subscriptions hear
    ``ANY_QUEUE`` (something may have committed meanwhile), then wake-ups again."""
    store = named_store
    consumer = store.listener()
    try:
        engine = sa.create_engine(postgresql_url, poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = :n AND query LIKE 'LISTEN%'"
                ),
                {"n": store.application_name},  # type: ignore[attr-defined]
            )
        engine.dispose()
        assert ANY_QUEUE in consumer.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # a commit before the LISTEN is covered by ANY
            store.publish([NewMessage(stream=uuid.uuid4().hex, queue="again", message={})])
            if "again" in consumer.wait(1):
                break
        else:
            pytest.fail("no wake-up after the LISTEN connection came back")
    finally:
        consumer.close()


def test_listening_fails_while_the_server_is_down_and_works_once_it_is_back(
    pg_server: Any,
) -> None:
    """A waiter that cannot listen hears so (and polls meanwhile); one that comes
    after the server is back listens again, on a connection made afresh."""
    store = EventStore(pg_server.url)
    try:
        store.migrate()
        store.listener(results=["warm"]).close()  # the process's LISTEN connection exists
        pg_server.halt("fast")
        deadline = time.monotonic() + 20
        while True:  # the switchboard notices the cut connection, then fails to connect
            try:
                store.listener(results=["down"]).close()
            except DatabaseUnavailable:
                break
            assert time.monotonic() < deadline, "listening never failed with the server down"
            time.sleep(0.2)
        pg_server.resume()
        deadline = time.monotonic() + 20
        while True:
            try:
                listener = store.listener(results=["back"])
                break
            except DatabaseUnavailable:
                assert time.monotonic() < deadline, "could not listen after the server came back"
                time.sleep(0.2)
        try:
            store.execute("back", lc.Revoke())
            got = listener.wait(5)  # may first hear ANY_QUEUE, for the reconnection
            assert "back" in got | listener.wait(5 if "back" not in got else 0)
        finally:
            listener.close()
    finally:
        store.close()
