"""Statements prepared on the server for psycopg2 (``?prepare_threshold=N``).

The whole store contract also runs with it (``test_postgresql_store.py``), and the
race tests race processes using it (``test_race.py``); these tests check what the
contract cannot see: what is sent, what the server holds, and the fallbacks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
import sqlalchemy as sa
from storehelpers import make_factory

from celery_eventstore import lifecycle as lc
from celery_eventstore.storage import EventStore, NewMessage

#: SQLSTATE invalid_sql_statement_name: EXECUTE of a name the session does not hold.
UNKNOWN_STATEMENT = "26000"


@pytest.fixture
def make_store(postgresql_db: tuple[str, dict[str, Any]]) -> Iterator[Any]:
    """Stores through psycopg2, with ``?prepare_threshold=<threshold>`` unless None."""
    url, options = postgresql_db
    factories = []

    def make(threshold: str | None) -> EventStore:
        given = sa.make_url(url).set(drivername="postgresql+psycopg2")
        if threshold is not None:
            given = given.update_query_dict({"prepare_threshold": threshold})
        factories.append(make_factory((given, options)))
        store: EventStore = next(factories[-1])()
        return store

    yield make
    for factory in factories:
        next(factory, None)  # closes its stores


def sent(store: EventStore) -> list[str]:
    """What the store's engine sends from now on, as the driver sent it."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, *args: Any) -> None:
        seen.append(cursor.query.decode())

    sa.event.listen(store.engine, "after_cursor_execute", record)
    return seen


@contextlib.contextmanager
def pooled_connections(store: EventStore) -> Iterator[list[Any]]:
    """Every connection idle in the store's pool, as the driver's (with its
    server session: what it holds prepared)."""
    pool = store.engine.pool
    connections = [pool.connect() for _ in range(pool.checkedin())]
    try:
        yield connections
    finally:
        for connection in connections:
            connection.close()


def held(store: EventStore) -> set[str]:
    """Names of the statements prepared on every pooled connection of the store."""
    names: set[str] = set()
    with pooled_connections(store) as connections:
        for connection in connections:
            cursor = connection.cursor()
            cursor.execute("SELECT name FROM pg_prepared_statements")
            names.update(name for (name,) in cursor.fetchall())
    return names


def one_cycle(store: EventStore, stream: str = "t1") -> None:
    store.publish([NewMessage(stream=stream, queue="q", message={"n": 1}, new_stream=True)])
    (claimed,) = store.claim_round([], ["q"], 1, "w", 30, next_due=True).claimed
    store.execute(stream, lc.Succeed(result={"r": 1}, claim=claimed.ref.claim))
    store.claim_round([claimed.ref], ["q"], 1, "w", 30)


def test_with_a_threshold_of_0_every_statement_runs_prepared(make_store):
    store = make_store("0")
    seen = sent(store)
    one_cycle(store)
    statements = [s for s in seen if not s.startswith(("SAVEPOINT", "RELEASE", "PREPARE"))]
    assert statements and all(s.startswith("EXECUTE ces_") for s in statements), statements
    assert {s.split()[1] for s in statements} <= held(store)
    assert [r.type for r in store.read_stream("t1")] == [
        "Published", "Claimed", "Succeeded", "Acked"]


def test_with_a_threshold_of_2_a_statement_runs_twice_as_it_is_first(make_store):
    store = make_store("2")
    seen = sent(store)
    with store.engine.connect() as conn:
        answers = [conn.exec_driver_sql("SELECT %(n)s::int * 2", {"n": n}).scalar()
                   for n in range(4)]
    assert answers == [0, 2, 4, 6]
    kinds = [s.split()[0] for s in seen]
    assert kinds == ["SELECT", "SELECT", "EXECUTE", "EXECUTE"]  # (PREPARE goes by the driver)


def test_without_a_threshold_a_statement_is_prepared_after_five_runs(make_store):
    """psycopg 3's default, which the store follows for psycopg2 on a connection
    straight to the server."""
    store = make_store(None)
    assert store.db.dialect.prepares
    seen = sent(store)
    with store.engine.connect() as conn:
        answers = [conn.exec_driver_sql("SELECT %(n)s::int * 3", {"n": n}).scalar()
                   for n in range(7)]
    assert answers == [n * 3 for n in range(7)]
    assert [s.split()[0] for s in seen] == ["SELECT"] * 5 + ["EXECUTE"] * 2
    assert {s.split()[1] for s in seen if s.startswith("EXECUTE")} <= held(store)
    assert store.statement_preparing() == (
        "prepared on the server, each after 5 runs on a connection")


def test_with_a_threshold_of_none_psycopg2_prepares_nothing(make_store):
    store = make_store("none")
    assert not store.db.dialect.prepares
    seen = sent(store)
    for n in range(7):  # more runs of each statement than the default threshold
        one_cycle(store, f"t{n}")
    assert seen and not any(s.startswith(("PREPARE", "EXECUTE")) for s in seen)
    assert held(store) == set()
    assert store.statement_preparing() == "not prepared (prepare_threshold=none)"


@pytest.mark.parametrize("in_transaction", [False, True])
def test_a_statement_the_server_will_not_prepare_runs_as_it_is(make_store, in_transaction):
    """``$1 + $2`` has no type the server can choose: PREPARE fails, and inside a
    transaction the failure does not abort it."""
    store = make_store("0")
    with store.engine.connect() as conn:
        if in_transaction:
            conn.begin()
        total = conn.exec_driver_sql("SELECT %(a)s + %(b)s", {"a": 2, "b": 3}).scalar()
        assert total == 5
        assert conn.exec_driver_sql("SELECT %(a)s::int * 2", {"a": 4}).scalar() == 8
        if in_transaction:
            conn.commit()


def test_a_connection_that_lost_its_prepared_statements_prepares_them_again(make_store):
    """``DEALLOCATE ALL`` (what a pooler's reset or a new server session does):
    the next run fails on an unknown name, is retried as a lost race, and prepares
    again; nothing is published twice."""
    store = make_store("0")
    store.publish([NewMessage(stream="a", queue="q", message={}, new_stream=True)])
    with store.engine.connect() as conn:
        conn.exec_driver_sql("DEALLOCATE ALL")
        conn.commit()
    store.publish([NewMessage(stream="b", queue="q", message={}, new_stream=True)])
    (claimed,) = store.claim(["q"], 1, "w", 30)
    assert store.ack([claimed.ref]) == {claimed.delivery: "done"}
    assert store.queue_size("q") == 1
    assert [r.type for r in store.read_stream("b")] == ["Published"]


def test_a_prepared_statement_outlives_the_transaction_that_prepared_it(make_store):
    store = make_store("0")
    with store.engine.connect() as conn:
        conn.begin()
        assert conn.exec_driver_sql("SELECT %(a)s::int + 1", {"a": 1}).scalar() == 2
        conn.rollback()
        assert conn.exec_driver_sql("SELECT %(a)s::int + 1", {"a": 2}).scalar() == 3


def test_an_error_in_a_prepared_statement_is_reported_as_without_it(make_store):
    store = make_store("0")
    with store.engine.connect() as conn, pytest.raises(sa.exc.DataError):
        conn.exec_driver_sql("SELECT %(a)s::int", {"a": "not a number"})


def test_a_statement_still_prepared_in_the_session_is_used_again(make_store):
    """The connection's map reset (after an unknown name) while the session
    still holds the others: preparing one again finds it there and uses it."""
    from celery_eventstore.storage.dialects import server_prepared

    store = make_store("0")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT %(a)s::int + 1", {"a": 1}).scalar() == 2
        conn.connection.info[server_prepared._KEY].clear()
        seen = sent(store)
        assert conn.exec_driver_sql("SELECT %(a)s::int + 1", {"a": 2}).scalar() == 3
    assert [s.split()[0] for s in seen] == ["EXECUTE"]


def test_statements_prepared_on_small_tables_use_the_indexes_once_they_grow(make_store):
    """A consumer prepares its claim round's statements while the tables are
    small; thousands of messages later each must still look rows up by index.
    The server keeps a statement's generic plan once chosen (until the tables'
    statistics change): one made on a small log must not hash all of it."""
    store = make_store("0")
    captured: dict[str, tuple[str, dict[str, Any]]] = {}

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if statement.startswith("EXECUTE") and isinstance(parameters, dict):
            captured[statement.split()[1]] = (statement, dict(parameters))

    refs: list[Any] = []

    def rounds(count: int) -> None:
        nonlocal refs
        for _ in range(count):
            refs = [m.ref for m in store.claim_round(refs, ["q"], 4, "w", 30,
                                                     next_due=True).claimed]

    store.publish([NewMessage(stream=f"s{n}", queue="q", message={}, new_stream=True)
                   for n in range(12)])
    # Prepared now, on a dozen rows, and run more than five times on each pooled
    # connection (the server may choose the generic plan after five).
    rounds(16)
    for batch in range(10):
        store.publish([NewMessage(stream=f"b{batch}-{n}", queue="q", message={},
                                  new_stream=True) for n in range(500)])
    sa.event.listen(store.engine, "after_cursor_execute", capture)
    rounds(4)
    sa.event.remove(store.engine, "after_cursor_execute", capture)
    assert captured
    scans = {}
    with pooled_connections(store) as connections:
        for number, connection in enumerate(connections):
            for name, (statement, parameters) in captured.items():
                cursor = connection.cursor()
                try:  # the plan the statement runs with now, without running it
                    cursor.execute("EXPLAIN (COSTS OFF) " + statement, parameters)
                except psycopg2.Error as error:
                    connection.rollback()
                    if error.pgcode == UNKNOWN_STATEMENT:  # not prepared on this one
                        continue
                    raise
                plan = [row[0] for row in cursor.fetchall()]
                connection.rollback()
                scans[(number, name)] = [line.strip() for line in plan
                                         if "Seq Scan on eventstore_" in line]
    assert scans and all(found == [] for found in scans.values()), scans
