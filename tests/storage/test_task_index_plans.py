"""``tasks`` is an index walk, whatever it filters by, on both dialects.

Listing 50 of a million tasks takes milliseconds only if the database walks an
index in the listing's order and stops at the limit: a plan that reads every
matching row and sorts it is fast on a test's few rows and slow on a real log.
So these tests read the plans, not the clock: SQLite's ``EXPLAIN QUERY PLAN``,
and PostgreSQL's ``EXPLAIN`` with sequential scans and sorts priced out (a
small table would otherwise be read whole, rightly) -- a plan that still sorts
has no index that serves the order.
"""

from __future__ import annotations

from typing import Any

import pytest
from storehelpers import FakeClock, make_factory

from celery_eventstore.storage import EventStore, NewMessage, TaskFilter

#: Filters served in the listing's order (the links select a few rows: sorted).
ORDERED = [
    TaskFilter(),
    TaskFilter(name="n1"),
    TaskFilter(state="SUCCESS"),
    TaskFilter(queue="q"),
    TaskFilter(worker="w"),
    TaskFilter(since=1.0),
    TaskFilter(until=2e9),
    TaskFilter(name="n1", since=1.0, until=2e9),
]
LINKS = [TaskFilter(parent_id="p"), TaskFilter(root_id="r"), TaskFilter(group_id="g")]


@pytest.fixture
def store(db: tuple[Any, dict[str, Any]]) -> Any:
    factory = make_factory(db)
    made = next(factory)(clock=FakeClock())
    # Several tasks of one transaction share a time: the id breaks the tie.
    made.publish([
        NewMessage(stream=f"t{i}", queue="q", message={}, metadata={"task": f"n{i % 2}"})
        for i in range(20)
    ])
    yield made
    next(factory, None)


def _plan(store: EventStore, where: TaskFilter) -> str:
    given = where.given()
    statement = store.queries.list_tasks(tuple(sorted(given))).params(**given, limit=50)
    sql = str(statement.compile(store.engine, compile_kwargs={"literal_binds": True}))
    with store.engine.connect() as conn:
        if store.dialect_name == "sqlite":
            return "\n".join(row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
        if store.schema:
            conn.exec_driver_sql(f"SET search_path TO {store.schema}")
        conn.exec_driver_sql("SET enable_seqscan = off")
        conn.exec_driver_sql("SET enable_sort = off")
        return "\n".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN {sql}"))


@pytest.mark.parametrize("where", ORDERED, ids=lambda w: ",".join(w.given()) or "all")
def test_each_filter_walks_an_index_in_the_listing_order(store: EventStore,
                                                         where: TaskFilter) -> None:
    plan = _plan(store, where)
    assert "INDEX" in plan.upper(), plan
    assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan


@pytest.mark.parametrize("where", LINKS, ids=lambda w: ",".join(w.given()))
def test_links_are_looked_up_by_index(store: EventStore, where: TaskFilter) -> None:
    plan = _plan(store, where)
    assert "INDEX" in plan.upper() and "SCAN eventstore_tasks\n" not in plan + "\n", plan
    assert "Seq Scan" not in plan, plan

