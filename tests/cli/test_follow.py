"""``tail -f``'s follower: an event that commits below positions already read
(a slow transaction) is still printed, once; a hole that never fills is dropped."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from celery_eventstore.history import LogFollower
from celery_eventstore.storage import EventStore, NewMessage


def msg(stream: str) -> NewMessage:
    return NewMessage(stream=stream, queue="q", message={"body": stream})


@pytest.fixture
def pg_store(postgresql_url: str) -> Iterator[EventStore]:
    schema = f"follow_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(postgresql_url)
    with engine.begin() as conn:
        conn.execute(sa.schema.CreateSchema(schema))
    store = EventStore(postgresql_url, schema=schema)
    store.migrate()
    yield store
    store.close()
    with engine.begin() as conn:
        conn.execute(sa.schema.DropSchema(schema, cascade=True))
    engine.dispose()


def test_postgresql_late_commit_below_the_high_water_mark_is_not_skipped(
    pg_store: EventStore,
) -> None:
    store = pg_store
    follower = LogFollower(store, 0)
    with store.engine.connect() as conn:
        slow = conn.begin()
        store.publish([msg("slow")], connection=conn)  # takes a position, not committed
        store.publish([msg("fast")])  # a higher position, committed at once
        assert [r.stream for r in follower.poll()] == ["fast"]
        assert len(follower.gaps) == 1
        slow.commit()
    assert [r.stream for r in follower.poll()] == ["slow"]
    assert follower.gaps == {} and follower.poll() == []


def test_postgresql_hole_of_a_rolled_back_insert_is_forgotten(pg_store: EventStore) -> None:
    store = pg_store
    now = [0.0]
    follower = LogFollower(store, 0, gap_timeout=30, clock=lambda: now[0])
    with store.engine.connect() as conn:
        doomed = conn.begin()
        store.publish([msg("ghost")], connection=conn)
        store.publish([msg("real")])
        assert [r.stream for r in follower.poll()] == ["real"]
        doomed.rollback()
    now[0] = 10
    assert follower.poll() == [] and len(follower.gaps) == 1
    now[0] = 31
    assert follower.poll() == [] and follower.gaps == {}


def test_sqlite_follower_reads_each_event_once(tmp_path: Path) -> None:
    store = EventStore(f"sqlite:///{tmp_path / 'f.db'}")
    store.migrate()
    try:
        follower = LogFollower(store, 0)
        store.publish([msg("a"), msg("b")])
        assert [r.stream for r in follower.poll()] == ["a", "b"]
        store.publish([msg("c")])
        assert [r.stream for r in follower.poll()] == ["c"]
        assert follower.poll() == [] and follower.gaps == {}
    finally:
        store.close()
