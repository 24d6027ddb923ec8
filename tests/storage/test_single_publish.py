"""A publish to a new task id in one statement (PostgreSQL), issue 15.

The whole store contract runs again with every publish hinted as a new stream,
so that the one-statement path writes what the generic path writes and steps
aside when the hint is wrong; the tests below check what the contract cannot
see: the statements sent, the wake-ups, and racing processes.
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import uuid

import pytest
import sqlalchemy as sa
from contract import StoreContract
from storehelpers import executed_statements, make_factory

from celery_eventstore import lifecycle as lc
from celery_eventstore.storage import EventStore, NewMessage


@pytest.fixture(params=["psycopg2", "psycopg"])
def driver_db(request, postgresql_db):
    url, options = postgresql_db
    return sa.make_url(url).set(drivername=f"postgresql+{request.param}"), options


def hinting(store: EventStore) -> EventStore:
    """Every publish of ``store`` claims its stream is new, right or wrong."""
    publish = store.publish

    def hinted(messages, **kw):
        return publish([dataclasses.replace(m, new_stream=True) for m in messages], **kw)

    store.publish = hinted  # type: ignore[method-assign]
    return store


class TestContractWithNewStreamHints(StoreContract):
    @pytest.fixture
    def make_store(self, driver_db):
        factory = make_factory(driver_db)
        make = next(factory)
        yield lambda **options: hinting(make(**options))
        next(factory, None)


@pytest.fixture
def store(driver_db):
    factory = make_factory(driver_db)
    yield next(factory)()
    next(factory, None)


def new(stream, queue="q", **kw):
    return NewMessage(stream=stream, queue=queue, message={"body": stream}, new_stream=True,
                      metadata={"task": "app.add", "root_id": "r1"}, **kw)


def test_a_publish_to_a_new_stream_is_one_statement_and_derives_what_a_rebuild_does(store):
    with executed_statements() as sent:
        store.publish([new("t1")])
    writes = [s for s in sent if not s.lstrip().upper().startswith(("COMMIT", "BEGIN"))]
    assert len(writes) == 1 and writes[0].lstrip().startswith("WITH"), sent
    (rec,) = store.read_stream("t1")
    assert rec.version == 1 and rec.event.message == {"body": "t1"}
    assert rec.metadata == {"task": "app.add", "root_id": "r1"}
    assert abs(rec.recorded_at - store.now()) < 60  # the database's clock
    (summary,) = store.tasks()
    assert (summary.task_id, summary.name, summary.queue, summary.state, summary.root_id) == (
        "t1", "app.add", "q", "PENDING", "r1")
    assert summary.created_at == rec.recorded_at
    live = store.projection_rows()
    store.rebuild()
    assert store.projection_rows() == live
    (claimed,) = store.claim(["q"], 1, "w", 30)
    assert claimed.message == {"body": "t1"} and claimed.stream == "t1"


def test_a_publish_of_our_own_commits_as_its_statement_runs(store, postgresql_db):
    """No BEGIN before the statement and no COMMIT after it (psycopg2 sends each
    as a round trip of its own): once it has run, the server holds no open
    transaction on that connection, and another connection already sees the
    message."""
    status_after: list[int] = []

    def after(conn, cursor, statement, *args):
        if statement.lstrip().startswith("WITH"):
            status_after.append(int(conn.connection.dbapi_connection.info.transaction_status))

    sa.event.listen(store.engine, "after_cursor_execute", after)
    try:
        store.publish([new("t1")])
    finally:
        sa.event.remove(store.engine, "after_cursor_execute", after)
    assert status_after == [0], status_after  # TRANSACTION_STATUS_IDLE: committed
    url, options = postgresql_db
    other = EventStore(url, **options)
    try:
        (claimed,) = other.claim(["q"], 1, "w", 30)
        assert claimed.stream == "t1"
    finally:
        other.close()
    # The pooled connection is back in its usual mode: a write of several
    # statements is one transaction again.
    with store.transaction() as conn:
        assert not conn.connection.dbapi_connection.autocommit


def test_a_wrong_hint_falls_back_to_the_stream_read(store):
    store.publish([new("t1")])
    with executed_statements() as sent:
        store.publish([new("t1")])  # the stream exists: loses on (stream, version)
    assert [r.version for r in store.read_stream("t1")] == [1, 2]
    assert len(sent) > 1
    assert store.queue_size("q") == 2


def test_a_publish_is_decided_without_the_clock():
    """The one-statement path decides a publish at time 0 and records the
    database's time: that is only the same decision if time does not enter it."""
    command = lc.Publish(delivery="d", queue="q", message={"m": 1}, not_before=5.0,
                         expires=9.0, priority=3)
    empty = lc.fold("t", ())
    assert lc.decide(command, empty, 0.0) == lc.decide(command, empty, 1e9)


@pytest.mark.parametrize("eta", [None, 3600.0])
def test_a_publish_in_one_statement_wakes_consumers_ready_or_scheduled(store, eta):
    """A scheduled message wakes consumers too: their ETA timer needs to know."""
    listener = store.listener()
    try:
        listener.poll()
        not_before = None if eta is None else store.now() + eta
        store.publish([new(f"t-{uuid.uuid4().hex}", queue="wq", not_before=not_before)])
        woken = listener.wait(10)
    finally:
        listener.close()
    assert "wq" in woken


def publish_new_streams(url, options, streams, out, same_delivery=False):
    """Publish one message to each of ``streams``; with ``same_delivery`` under a
    delivery id every racer shares, as retries of one publish are."""
    store = EventStore(url, **options)
    try:
        for stream in streams:
            delivery = f"{stream}-d" if same_delivery else None
            store.publish([new(stream, queue="race", delivery=delivery)])
        out.put(len(streams))
    except Exception as exc:  # reported to the test instead of hanging it
        out.put(repr(exc))
    finally:
        store.close()


def race_publishers(store, streams, *, same_delivery):
    """Four spawned processes run :func:`publish_new_streams` on ``store``'s
    database at once; each must report every publish done."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    url = store.url.render_as_string(hide_password=False)
    options = {"schema": store.schema, "table_prefix": store.table_prefix}
    procs = [ctx.Process(target=publish_new_streams,
                         args=(url, options, streams, out, same_delivery))
             for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert results == [len(streams)] * 4, results


def test_racing_processes_publishing_to_the_same_new_streams_lose_nothing(store):
    """Four processes publish to the same 200 new task ids at once: every publish
    lands once, at its own version, with its queue row and one index row."""
    streams = [f"same-{i}" for i in range(200)]
    race_publishers(store, streams, same_delivery=False)
    events = store.read_all(limit=10_000)
    per_stream = collections.Counter(e.stream for e in events)
    assert per_stream == {s: 4 for s in streams}
    assert all(sorted(r.version for r in store.read_stream(s)) == [1, 2, 3, 4]
               for s in streams[:20])
    assert store.queue_size("race") == 800
    assert len(store.tasks(limit=1000)) == 200
    live = store.projection_rows()
    store.rebuild()
    assert store.projection_rows() == live


def test_racing_processes_publishing_the_same_deliveries_record_each_once(store):
    """Four processes publish the same 200 deliveries to new task ids at once (a
    retried publish racing the one it repeats): each lands once, none fails."""
    streams = [f"again-{i}" for i in range(200)]
    race_publishers(store, streams, same_delivery=True)
    events = store.read_all(limit=10_000)
    assert collections.Counter(e.stream for e in events) == {s: 1 for s in streams}
    assert {e.event.delivery for e in events} == {f"{s}-d" for s in streams}
    assert store.queue_size("race") == 200
    live = store.projection_rows()
    store.rebuild()
    assert store.projection_rows() == live
