"""A long log: seeding one in bulk; the reads a claim, a publish and the CLI make
of it are index lookups, with or without the planner's statistics; and pruning it
in short batches while a consumer keeps working."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from storehelpers import cycle_until_stopped

from celery_eventstore.storage import EventStore, NewMessage

SEEDED = 30_000


@pytest.fixture
def store(db: tuple[Any, dict[str, Any]]) -> Iterator[EventStore]:
    url, options = db
    store = EventStore(url, **options)
    store.migrate()
    yield store
    store.close()


def plan(store: EventStore, statement: sa.Executable, **params: Any) -> list[str]:
    """The plan of ``statement`` (literal parameters), one line per row."""
    sql = statement.params(**params).compile(  # type: ignore[attr-defined]
        store.engine, compile_kwargs={"literal_binds": True, "render_postcompile": True}
    )
    explain = "EXPLAIN QUERY PLAN" if store.dialect_name == "sqlite" else "EXPLAIN"
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql(f"{explain} {str(sql).replace('%', '%%')}").all()
    return [str(row[-1]) for row in rows]


def test_seeded_tasks_are_settled_streams_a_rebuild_agrees_with(store):
    assert store.seed_settled(1200, queue="celery", stream_prefix="s-") == 1200
    assert store.last_position() == 3600
    assert [r.type for r in store.read_stream("s-1200")] == ["Published", "Claimed", "Acked"]
    assert store.load("s-7").delivery("s-7.d").status.is_final
    live = store.projection_rows()
    store.rebuild()
    assert store.projection_rows() == live


@pytest.mark.slow
def test_reading_streams_looks_each_up_by_index_even_without_statistics(store):
    store.seed_settled(SEEDED)
    # The shared test server runs without autovacuum: the log has no statistics.
    lines = plan(store, store.queries.read_streams,
                 streams=[f"seed-{i}" for i in range(1, SEEDED, SEEDED // 100)])
    events = store.tables.events.name
    assert not [line for line in lines if "Seq Scan" in line or f"SCAN {events}" in line], lines


def test_the_last_position_is_one_index_lookup(store):
    store.seed_settled(2000)
    lines = plan(store, store.queries.last_position)
    events = store.tables.events.name
    if store.dialect_name == "postgresql":
        assert any("Index Only Scan Backward" in line or "Index Scan Backward" in line
                   for line in lines), lines
    else:  # SQLite answers max() of the rowid from the end of the table's b-tree
        assert not [line for line in lines if line.startswith(f"SCAN {events}")], lines
    assert not [line for line in lines if "Seq Scan" in line], lines


# -- prune ---------------------------------------------------------------------------


def test_a_prune_batch_reads_the_log_by_primary_key_and_stream(store):
    store.seed_settled(3000, recorded_at=1000.0)
    q = store.queries
    batch = plan(store, q.old_streams, before=2000.0, after=0, upto=9000, limit=500)
    streams = plan(store, q.stream_events, streams=[f"seed-{i}" for i in range(1, 500)])
    events = store.tables.events.name
    for lines in (batch, streams):
        assert not [line for line in lines if "Seq Scan" in line or f"SCAN {events}" in line], (
            lines
        )


@pytest.mark.slow
def test_a_consumer_keeps_claiming_while_prune_runs(db):
    url, options = db
    store = EventStore(url, **options)
    store.migrate()
    old = store.now() - 86400
    store.seed_settled(SEEDED, recorded_at=old, stream_prefix="old-")
    store.publish([NewMessage(stream="old-pending", queue="kept", message={})])
    ctx = multiprocessing.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    plain = store.url.render_as_string(False)
    consumer = ctx.Process(
        target=cycle_until_stopped, args=(plain, options, "busy", ready, stop, out)
    )
    consumer.start()
    try:
        assert ready.wait(60), "the consumer never got going"
        calls: list[tuple[int, int]] = []
        started = time.time()
        pruned = store.prune(before=old + 1, batch=250, progress=lambda *a: calls.append(a))
        finished = time.time()
    finally:
        stop.set()
        cycles = out.get(timeout=60)
        consumer.join(30)
    assert pruned == SEEDED
    assert len(calls) >= SEEDED // 250 and calls[-1] == (SEEDED, SEEDED)
    assert [r.type for r in store.read_stream("old-pending")] == ["Published"]
    assert store.read_stream("old-1") == [] and store.read_stream(f"old-{SEEDED}") == []
    during = [t for t in cycles if started <= t <= finished]
    assert len(during) >= 5, (len(during), finished - started)
    gaps = [b - a for a, b in zip([started, *during], [*during, finished], strict=True)]
    # A batch holds nothing a consumer needs for longer than its own short
    # transaction: no wait comes near a lock held for the whole prune (relative,
    # as the machine may be shared).
    took = finished - started
    assert max(gaps) < max(1.0, took / 4), (max(gaps), gaps.index(max(gaps)), len(gaps), took)
    store.close()


# -- canvases ----------------------------------------------------------------------


def test_streams_linked_by_root_and_group_are_index_lookups(store):
    store.seed_settled(3000)
    store.publish([
        NewMessage(stream="root", queue="q", message={}, metadata={"root_id": "root"}),
        NewMessage(stream="child", queue="q", message={},
                   metadata={"root_id": "root", "parent_id": "root", "group": "g1"}),
        NewMessage(stream="sibling", queue="q", message={},
                   metadata={"root_id": "root", "group": "g1"}),
        NewMessage(stream="other", queue="q", message={}, metadata={"root_id": "other"}),
    ])
    assert store.streams_linked("root_id", "root") == ["child", "sibling"]
    assert store.streams_linked("group", "g1") == ["child", "sibling"]
    assert store.streams_linked("root_id", "other") == []
    events = store.tables.events.name
    for link in ("root_id", "group"):
        lines = plan(store, store.queries.streams_linked[link], value="root")
        if store.dialect_name == "postgresql":
            assert not [line for line in lines if "Seq Scan" in line], lines
            assert any(f"{events}_{link}" in line for line in lines), lines
        else:
            assert any(f"USING INDEX {events}_{link}" in line for line in lines), lines
