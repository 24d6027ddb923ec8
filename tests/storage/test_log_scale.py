"""A long log: seeding one in bulk, and the reads a claim, a publish and the CLI
make of it are index lookups, with or without the planner's statistics."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from celery_eventstore.storage import EventStore

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
