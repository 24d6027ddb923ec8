"""Point-in-time replay (issue 14, item 5): the queues folded from the log up to a
position or a time equal the live counts the store showed at that moment."""

from __future__ import annotations

import pytest
from storehelpers import FakeClock, make_factory

from celery_eventstore.replay import replay
from celery_eventstore.storage import NewMessage


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(db, clock):
    factory = make_factory(db)
    yield next(factory)(clock=clock)
    next(factory, None)


def publish(store, stream, queue="q1", **kw):
    store.publish([NewMessage(stream=stream, queue=queue, message={"body": stream}, **kw)])


def live(store, clock):
    """What `queues` shows now, and the log position and time it shows it at;
    then a second passes, so each snapshot has a time of its own."""
    counts = {
        s.queue: {"ready": s.ready, "scheduled": s.scheduled, "claimed": s.claimed,
                  "dead": s.dead}
        for s in store.queue_stats()
    }
    snapshot = store.last_position(), store.now(), counts
    clock.advance(1)
    return snapshot


def replayed(then):
    return {q.queue: q.counts() for q in then.queues}


def test_replay_at_each_position_equals_the_live_snapshot(store, clock):
    snapshots = []
    publish(store, "a")
    publish(store, "b", not_before=clock.now + 100)
    publish(store, "c", queue="q2")
    snapshots.append(live(store, clock))
    (a,) = store.claim(["q1"], 5, "w1", 30)
    snapshots.append(live(store, clock))
    store.ack([a.ref])
    (c,) = store.claim(["q2"], 1, "w2", 30)
    snapshots.append(live(store, clock))
    store.reject([c.ref], requeue=False)
    publish(store, "d", expires=clock.now + 50)
    snapshots.append(live(store, clock))
    clock.advance(200)  # b is due, d has expired (still counted until claimed)
    publish(store, "e")
    snapshots.append(live(store, clock))
    claimed = store.claim(["q1"], 1, "w1", 30)
    snapshots.append(live(store, clock))
    clock.advance(60)  # its lease runs out: the next claim takes it over
    publish(store, "f", queue="q2")
    store.claim(["q1"], 5, "w3", 30)
    snapshots.append(live(store, clock))
    store.purge_dead("q2")
    store.revoke("f")
    snapshots.append(live(store, clock))
    assert claimed and len(snapshots) == 8
    assert len({position for position, _, _ in snapshots}) == len(snapshots)

    for position, now, counts in snapshots:
        assert replayed(replay(store, position=position)) == counts, position
        assert replayed(replay(store, at=now)) == counts, now
    # Nothing was read from a snapshot: the derived tables may be gone.
    assert replay(store, position=snapshots[0][0]).position == snapshots[0][0]


def test_replay_names_the_tasks_and_their_workers(store, clock):
    publish(store, "a")
    publish(store, "b", not_before=clock.now + 100)
    publish(store, "c")
    (first,) = store.claim(["q1"], 1, "w1", 30)
    position = store.last_position()
    store.ack([first.ref])
    store.claim(["q1"], 1, "w2", 30)

    (q1,) = replay(store, position=position).queues
    assert q1.in_flight == [(first.stream, "w1")]
    assert q1.ready == ["c"] and q1.scheduled == ["b"]
    (q1,) = replay(store, position=store.last_position()).queues
    assert q1.in_flight == [("c", "w2")] and q1.ready == []
    assert q1.as_json()["tasks"]["in_flight"] == [{"task": "c", "worker": "w2"}]


def test_replay_before_anything_happened_is_empty(store):
    publish(store, "a")
    assert replay(store, position=0).queues == []
    with pytest.raises(ValueError):
        replay(store)
