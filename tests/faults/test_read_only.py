"""The database turns read-only for a while; nothing dies and nothing is lost
(issue 10, item 4).

A primary being failed over, or switched for maintenance, refuses writes
(SQLSTATE 25006) while it still accepts connections and reads.  That is a
connection-class state, like an admin shutdown or "too many connections": the
store raises ``DatabaseUnavailable``, which the transport lists in
``connection_errors``, so a worker waits and reconnects and a producer gets
kombu's ``OperationalError`` once Celery's publish retries are used up.

The spell is made the way an operator would: ``ALTER SYSTEM SET
default_transaction_read_only`` and a configuration reload, on a private server;
sessions already open pick it up for their next transaction.
"""

from __future__ import annotations

import time
from typing import Any

import kombu.exceptions
import pytest
import sqlalchemy as sa
from harness import Broker, Producer, wait_for
from pgserver import EmbeddedPostgres
from tally import Faults, Window, count, finished, settle

from celery_eventstore import lifecycle as lc
from celery_eventstore.exceptions import DatabaseUnavailable
from celery_eventstore.storage import EventStore, NewMessage

#: How long the database stays read-only: longer than Celery's publish retries
#: (about 0.6 s) and than a worker's first reconnect attempts.
READ_ONLY_SECONDS = 4.0
#: Tasks that must have run before the spell, and been published after it.
BEFORE, AFTER = 30, 60
TIMEOUT = 90.0


def set_read_only(server: EmbeddedPostgres, on: bool) -> None:
    """Turn the whole server read-only (or writable again), as an operator would."""
    engine = sa.create_engine(server.url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            value = "on" if on else "off"
            conn.exec_driver_sql(f"ALTER SYSTEM SET default_transaction_read_only = {value}")
            conn.exec_driver_sql("SELECT pg_reload_conf()")
    finally:
        engine.dispose()


def _publish(store: EventStore, stream: str) -> None:
    store.publish([NewMessage(stream=stream, queue="q", message={"body": stream})])


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_postgresql_read_only_is_unavailable_then_writable(
    pg_server: EmbeddedPostgres, driver: str
) -> None:
    """Every write on a read-only server is ``DatabaseUnavailable`` (not a refusal a
    worker dies of), reads still work, and the same store writes again after."""
    store = EventStore(pg_server.url.replace("psycopg2", driver))
    try:
        store.migrate()
        _publish(store, "before")
        set_read_only(pg_server, True)
        try:
            # Its pooled sessions pick the setting up for their next transaction
            # (publishes until then go through).
            wait_for(lambda: _refused(lambda: _publish(store, "probe")), 10,
                     "the server to refuse writes")  # fmt: skip
            with pytest.raises(DatabaseUnavailable, match="read-only"):
                store.claim(["q"], 1, "consumer", 10.0)
            # Reads go on: a stream's history, a task's result.
            assert [r.type for r in store.read_stream("before")] == ["Published"]
            assert store.results(["before"]) == {}
        finally:
            set_read_only(pg_server, False)
        wait_for(lambda: not _refused(lambda: _publish(store, "after")), 10,
                 "the server to take writes again")  # fmt: skip
        claimed = store.claim(["q"], 100, "consumer", 10.0)
        assert {m.stream for m in claimed} >= {"before", "after"}
    finally:
        store.close()


def _refused(write: Any) -> bool:
    try:
        write()
    except DatabaseUnavailable:
        return True
    return False


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_postgresql_too_many_connections_is_unavailable(
    pg_server: EmbeddedPostgres, driver: str
) -> None:
    """A role out of connections (SQLSTATE 53300) is a wait, not a refusal."""
    admin = sa.create_engine(pg_server.url, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql("CREATE ROLE crowded LOGIN CONNECTION LIMIT 0")
    admin.dispose()
    url = pg_server.url.replace("psycopg2", driver).replace("postgres@", "crowded@")
    store = EventStore(url)
    try:
        with pytest.raises(DatabaseUnavailable, match="too many connections"):
            store.ping()
    finally:
        store.close()


def test_sqlite_read_only_file_is_unavailable(tmp_path: Any) -> None:
    """SQLite's "attempt to write a readonly database" is a wait as well (a file
    remounted read-only, a permission being fixed), while reads go on."""
    path = tmp_path / "broker.db"
    writable = EventStore(f"sqlite:///{path}")
    writable.migrate()
    _publish(writable, "before")
    writable.close()
    read_only = EventStore(f"sqlite:///file:{path}?mode=ro&uri=true")
    try:
        with pytest.raises(DatabaseUnavailable, match="readonly"):
            _publish(read_only, "during")
        assert [r.type for r in read_only.read_stream("before")] == ["Published"]
    finally:
        read_only.close()


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["postgresql"], indirect=True)
def test_worker_and_producer_ride_out_a_read_only_spell(
    broker: Broker, pg_server: EmbeddedPostgres, start_worker: Any, result_app: Any
) -> None:
    """The database goes read-only for a few seconds while a producer publishes and
    a worker drains: the worker never exits and drains everything after; each
    publish succeeded or raised kombu's ``OperationalError``; nothing is lost."""
    worker = start_worker(app="resultproj")
    producer = Producer(result_app, "resultproj.effect", {"sleep": 0.02}, interval=0.02)
    faults = Faults()
    producer.start()
    try:
        wait_for(lambda: finished(broker, producer.published) >= BEFORE, TIMEOUT,
                 f"{BEFORE} tasks to run before the spell")  # fmt: skip
        start = time.time()
        set_read_only(pg_server, True)
        try:
            wait_for(lambda: producer.failed, TIMEOUT, "a publish to fail")
            time.sleep(max(0.0, start + READ_ONLY_SECONDS - time.time()))
        finally:
            set_read_only(pg_server, False)
            # Sessions see the reload when they next start a transaction: the spell
            # is over once a fresh write goes through.
            wait_for(lambda: not _refused(lambda: _publish(broker.store, "probe")), 10,
                     "the server to take writes again")  # fmt: skip
            faults.windows.append(Window(start, time.time()))
        resumed = len(producer.published)
        wait_for(lambda: len(producer.published) >= resumed + AFTER, TIMEOUT,
                 f"{AFTER} publishes after the spell",
                 show=lambda: producer.failed[-3:])  # fmt: skip
    finally:
        producer.stop()
    failed = [t for t, _ in producer.failed]
    settle(broker, producer.published, failed, timeout=TIMEOUT)
    counts = count(broker, producer.published, failed, faults)
    print(counts.line(f"read-only {READ_ONLY_SECONDS:.0f}s"))

    assert worker.proc.poll() is None, f"the worker exited:\n{worker.tail()}"
    assert "Connection to broker lost" in worker.log()
    # The same worker process ran the tasks published after the spell.
    last = broker.events(producer.published[-1])
    claims = [r.event for r in last if isinstance(r.event, lc.Claimed)]
    assert claims and f":{worker.proc.pid}:" in claims[-1].consumer
    assert producer.failed, "no publish failed while the database was read-only"
    for task_id, exc in producer.failed:
        assert isinstance(exc, kombu.exceptions.OperationalError), (task_id, repr(exc))
        assert isinstance(exc.__cause__, DatabaseUnavailable), (task_id, repr(exc.__cause__))
    # A publish refused by a read-only database left nothing behind.
    assert counts.refused == len(failed)
    assert counts.lost == [], counts.lost[:10]
    assert counts.unexplained == [], counts.unexplained[:3]

