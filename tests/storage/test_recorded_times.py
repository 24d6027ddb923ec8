"""A stream's recorded times never run backwards (issue 14, item 4).

Each transaction reads the clock first and the stream afterwards: a transaction
slowed down in between appends after events of transactions that read the clock
later, and a host's clock (SQLite's) can be stepped back.  Either way the next
event of a stream is recorded no earlier than the stream's last one.
"""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from storehelpers import FakeClock, make_factory

from celery_eventstore import lifecycle as lc
from celery_eventstore.storage import NewMessage


@pytest.fixture
def make_store(db):
    yield from make_factory(db)


def times(store, stream):
    return [(r.type, r.recorded_at) for r in store.read_stream(stream)]


def test_a_clock_stepped_back_does_not_move_a_stream_back(make_store):
    clock = FakeClock(1_000_000.0)
    store = make_store(clock=clock)
    store.publish([NewMessage(stream="t1", queue="q", message={"body": "1"})])
    clock.advance(-10)  # NTP steps the host's clock back
    (claimed,) = store.claim(["q"], 1, "w1", 60)
    store.execute("t1", lc.Start(worker="w1", claim=claimed.claim))
    clock.advance(-5)
    store.ack([claimed.ref])
    recorded = times(store, "t1")
    assert [t for _, t in recorded] == [1_000_000.0] * 4, recorded
    # A stream the clock never saw is recorded at the clock's own time.
    store.publish([NewMessage(stream="t2", queue="q", message={"body": "2"})])
    assert times(store, "t2") == [("Published", 1_000_000.0 - 15)]


def test_times_rise_with_the_clock(make_store):
    clock = FakeClock(1_000_000.0)
    store = make_store(clock=clock)
    store.publish([NewMessage(stream="t1", queue="q", message={"body": "1"})])
    clock.advance(2)
    (claimed,) = store.claim(["q"], 1, "w1", 60)
    assert [t for _, t in times(store, "t1")] == [1_000_000.0, 1_000_002.0]
    assert claimed.lease_until == 1_000_062.0


def test_a_slow_transaction_appends_after_a_later_one_at_the_later_time(db):
    """PostgreSQL (READ COMMITTED): a transaction that read its clock, then stalled
    while another committed an event on the same stream, reads that event and
    appends after it.  SQLite's writers take the lock before they read the clock,
    so there the race cannot happen and the test runs the two in turn."""
    factory = make_factory(db)
    make = next(factory)
    slow, fast = make(), make()
    slow.publish([NewMessage(stream="t1", queue="q", message={"body": "1"})])
    (claimed,) = slow.claim(["q"], 1, "w1", 60)
    if slow.dialect_name != "postgresql":
        fast.execute("t1", lc.Start(worker="w1", claim=claimed.claim))
        slow.ack([claimed.ref])
    else:
        read_stream = slow.queries.read_streams
        stalled, go = threading.Event(), threading.Event()

        def stall(conn, clauseelement, *args):
            if clauseelement is read_stream and not stalled.is_set():
                stalled.set()  # the clock is read; the stream is not yet
                go.wait(30)

        sa.event.listen(slow.engine, "before_execute", stall)
        acking = threading.Thread(target=slow.ack, args=([claimed.ref],))
        acking.start()
        assert stalled.wait(30)
        fast.execute("t1", lc.Start(worker="w1", claim=claimed.claim))
        go.set()
        acking.join(30)
        sa.event.remove(slow.engine, "before_execute", stall)
    recorded = times(slow, "t1")
    assert [name for name, _ in recorded] == ["Published", "Claimed", "Started", "Acked"]
    stamps = [t for _, t in recorded]
    assert stamps == sorted(stamps), recorded
    next(factory, None)
