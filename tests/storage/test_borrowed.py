"""Publishing through a caller's own DB-API connection (psycopg2, psycopg 3, sqlite3).

The store must write inside the caller's open transaction and do nothing else to
it: no COMMIT, no ROLLBACK, no BEGIN, no SET, no change of autocommit or isolation
level.  Each test takes a fingerprint of the caller's transaction before and after:

* PostgreSQL: the transaction's start time and id (``now()`` and
  ``pg_current_xact_id_if_assigned()`` change with any COMMIT or ROLLBACK) and every
  session setting (``pg_settings`` shows a SET or SET LOCAL until the transaction ends);
* SQLite: every statement the connection runs (``set_trace_callback``).

``test_a_naive_engine_is_caught`` shows the fingerprint catches the rollback that
wrapping the connection in an ordinary SQLAlchemy engine issues.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from storehelpers import make_factory

from celery_eventstore.storage import (
    NONE,
    OPEN,
    EventStore,
    NewMessage,
    QueueInfo,
    describe_connection,
)

#: SQLite statements that would mean the store controlled the caller's transaction.
_CONTROL = re.compile(r"^\s*(BEGIN|COMMIT|END|ROLLBACK|RELEASE|SAVEPOINT|PRAGMA)\b", re.I)


@pytest.fixture
def store(db: tuple[Any, dict[str, Any]]) -> Iterator[EventStore]:
    factory = make_factory(db)
    yield next(factory)()
    next(factory, None)


class Caller:
    """An application's connection with its own table and an open transaction."""

    def __init__(self, store: EventStore, driver: str | None = None) -> None:
        self.store = store
        url = store.url
        if driver is not None:
            url = url.set(drivername=f"postgresql+{driver}")
        self.schema = store.schema
        self.traced: list[str] = []
        if url.get_backend_name() == "sqlite":
            self.conn: Any = sqlite3.connect(url.database, timeout=30)
        else:
            driver = __import__(url.get_driver_name())
            self.conn = driver.connect(
                host=url.host, port=url.port, user=url.username, dbname=url.database
            )
        self.table = f"{self.schema}.orders" if self.schema else "orders"
        self.run(f"CREATE TABLE {self.table} (id VARCHAR(40) PRIMARY KEY)")
        self.conn.commit()

    @property
    def postgresql(self) -> bool:
        return not isinstance(self.conn, sqlite3.Connection)

    def run(self, sql: str) -> list[Any]:
        cur = self.conn.cursor()
        cur.execute(sql)
        rows = cur.fetchall() if cur.description else []
        cur.close()
        return rows

    def fingerprint(self) -> Any:
        if self.postgresql:
            return (
                self.run("SELECT now(), pg_current_xact_id_if_assigned()::text"),
                self.run("SELECT name, setting FROM pg_settings ORDER BY name"),
                self.conn.autocommit,
                self.conn.isolation_level,
            )
        return (self.conn.in_transaction, self.conn.isolation_level)

    def trace(self) -> None:
        if not self.postgresql:
            self.conn.set_trace_callback(self.traced.append)

    def orders(self) -> set[str]:
        return {row[0] for row in self.run(f"SELECT id FROM {self.table}")}


@pytest.fixture
def caller(store: EventStore) -> Iterator[Caller]:
    c = Caller(store)
    yield c
    c.conn.close()


def _publish(store: EventStore, conn: sa.Connection, stream: str) -> None:
    store.declare_queue(QueueInfo("q", transient=False), connection=conn)
    store.publish([NewMessage(stream=stream, queue="q", message={"body": stream})],
                  connection=conn)
    # A second publish to the same stream reads it first (the retry path).
    store.publish([NewMessage(stream=stream, queue="q", message={"body": "again"},
                              new_stream=False)], connection=conn)


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_the_store_writes_inside_the_callers_transaction_and_nothing_more(
    store: EventStore, caller: Caller, outcome: str
) -> None:
    caller.run(f"INSERT INTO {caller.table} VALUES ('o1')")
    before = caller.fingerprint()
    info = describe_connection(caller.conn)
    assert info is not None and info.transaction == OPEN
    assert store.same_database(info.url)

    caller.trace()
    with store.borrow(caller.conn, info) as conn:
        _publish(store, conn, "job-o1")
    with store.borrow(caller.conn, info) as conn:  # a second lend on the same connection
        _publish(store, conn, "job-o2")

    assert caller.fingerprint() == before
    assert not [s for s in caller.traced if _CONTROL.match(s)], caller.traced
    assert caller.orders() == {"o1"}, "the caller's own write was rolled back"
    assert store.read_stream("job-o1") == [], "the store committed the caller's transaction"

    getattr(caller.conn, outcome)()
    published = [r.type for r in store.read_stream("job-o1")]
    assert published == (["Published", "Published"] if outcome == "commit" else [])
    assert store.queue_size("q") == (4 if outcome == "commit" else 0)
    assert caller.orders() == ({"o1"} if outcome == "commit" else set())


@pytest.mark.parametrize(("store_driver", "caller_driver"),
                         [("psycopg2", "psycopg"), ("psycopg", "psycopg2")])
def test_a_caller_on_the_other_postgresql_driver(
    postgresql_db: tuple[str, dict[str, Any]], store_driver: str, caller_driver: str
) -> None:
    """The store's dialect is psycopg2's and Django's connection is psycopg 3's (or the
    reverse): the other driver's dialect is set up on a connection of the store's,
    made with the application's connect_args."""
    url, options = postgresql_db
    store = EventStore(
        sa.make_url(url).set(drivername=f"postgresql+{store_driver}"),
        engine_options={"connect_args": {"application_name": "eventstore-lender"}},
        **options,
    )
    store.migrate()
    caller = Caller(store, caller_driver)
    try:
        caller.run(f"INSERT INTO {caller.table} VALUES ('o1')")
        before = caller.fingerprint()
        info = describe_connection(caller.conn)
        assert info is not None and info.url.get_driver_name() == caller_driver
        with store.borrow(caller.conn, info) as conn:
            _publish(store, conn, "job-o1")
        assert caller.fingerprint() == before
        caller.conn.commit()
        assert [r.type for r in store.read_stream("job-o1")] == ["Published", "Published"]
    finally:
        caller.conn.close()
        store.close()


def test_an_autocommit_connection_has_no_transaction_to_join(
    store: EventStore, caller: Caller
) -> None:
    if caller.postgresql:
        caller.conn.autocommit = True
    else:
        caller.conn.isolation_level = None
    info = describe_connection(caller.conn)
    assert info is not None and info.transaction == NONE


def test_a_naive_engine_is_caught(store: EventStore, caller: Caller) -> None:
    """The control: an ordinary engine over the caller's connection rolls it back
    on first connect, and the fingerprint shows it."""
    caller.run(f"INSERT INTO {caller.table} VALUES ('o1')")
    before = caller.fingerprint()
    caller.trace()
    naive = sa.create_engine(
        store.url.set(drivername=describe_connection(caller.conn).url.drivername),  # type: ignore[union-attr]
        creator=lambda: caller.conn,
        poolclass=sa.pool.StaticPool,
    )
    with naive.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    if caller.postgresql:
        assert caller.fingerprint() != before
    else:
        assert [s for s in caller.traced if _CONTROL.match(s)]
    assert caller.orders() == set(), "the naive engine's rollback discarded the caller's write"


def test_a_connection_through_the_unix_socket_is_on_the_local_server() -> None:
    """psycopg reports a socket connection's host as the socket's directory; the
    store's URL names no host for the same server."""
    from celery_eventstore.storage.dialects import dialect_for

    store_url = sa.make_url("postgresql://app@/app")
    dialect = dialect_for(store_url)
    socket = sa.URL.create("postgresql+psycopg2", host="/var/run/postgresql", database="app")
    assert dialect.same_database(socket, store_url)
    assert not dialect.same_database(socket.set(database="other"), store_url)
    assert not dialect.same_database(socket.set(host="db.example"), store_url)
