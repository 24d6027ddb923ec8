"""Failover to a streaming replica while a worker drains and a producer publishes
(issue 11, item 3).

The test builds a replica of its private PostgreSQL with ``pg_basebackup``, makes
replication synchronous, and points the worker and the producer at both servers
through one multi-host URL with ``target_session_attrs=read-write``: libpq
connects to whichever of them takes writes.  Mid-run it kills the primary
(``pg_ctl stop -m immediate``, a crash), waits a moment -- the read-only window,
where the only server left is a standby that refuses writes -- and promotes the
replica.  Nobody restarts or reconfigures the worker or the producer.

With synchronous replication every commit that waited for the disk (publishes,
results) was on the replica before it was acknowledged, so nothing acknowledged
is lost.  Claims, acks and lease renewals commit without waiting
(``async_commit``) and may be lost with the primary: that costs a redelivery,
counted as an explained re-run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from harness import Broker, Producer, open_broker, wait_for
from pgserver import EmbeddedPostgres
from tally import Faults, Window, count, finished, settle

from celery_eventstore.exceptions import DatabaseUnavailable

#: Tasks that must have run before the primary dies, and publishes after promotion.
BEFORE, AFTER = 40, 60
#: How long the standby alone serves (read-only) before it is promoted.
READ_ONLY_SECONDS = 3.0
TIMEOUT = 120.0


def _admin(url: str) -> sa.Engine:
    return sa.create_engine(url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")


def make_synchronous(primary: EmbeddedPostgres) -> None:
    """Commits wait until the standby has flushed them (any standby counts)."""
    engine = _admin(primary.url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("ALTER SYSTEM SET synchronous_standby_names = '*'")
            conn.exec_driver_sql("SELECT pg_reload_conf()")

        def synchronous() -> bool:
            with engine.connect() as conn:
                states = conn.exec_driver_sql(
                    "SELECT sync_state FROM pg_stat_replication"
                ).scalars().all()
            return states == ["sync"]

        wait_for(synchronous, 30, "the replica to replicate synchronously")
    finally:
        engine.dispose()


@pytest.fixture
def replica(pg_server: EmbeddedPostgres) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres.replica_of(pg_server)
    try:
        make_synchronous(pg_server)
        yield server
    finally:
        server.stop()


def multi_host_url(primary: EmbeddedPostgres, replica: EmbeddedPostgres) -> str:
    base = sa.make_url(primary.url).set(host=None, port=None)
    return base.update_query_pairs([
        ("host", f"127.0.0.1:{primary.port}"),
        ("host", f"127.0.0.1:{replica.port}"),
        ("target_session_attrs", "read-write"),
    ]).render_as_string(hide_password=False)


@pytest.fixture
def broker(
    request: pytest.FixtureRequest, tmp_path: Path, pg_server: EmbeddedPostgres,
    replica: EmbeddedPostgres,
) -> Iterator[Broker]:
    yield from open_broker(request, tmp_path, None, multi_host_url(pg_server, replica))


def _writable(store: Any) -> bool:
    try:
        store.ping()
        store.now()
        with store.transaction():
            pass
    except DatabaseUnavailable:
        return False
    return True


@pytest.mark.slow
def test_worker_and_producer_carry_on_after_failover_to_a_synchronous_replica(
    broker: Broker, pg_server: EmbeddedPostgres, replica: EmbeddedPostgres,
    start_worker: Any, result_app: Any,
) -> None:
    worker = start_worker(app="resultproj")
    producer = Producer(result_app, "resultproj.effect", {"sleep": 0.01}, interval=0.02)
    faults = Faults()
    producer.start()
    try:
        wait_for(lambda: finished(broker, producer.published) >= BEFORE, TIMEOUT,
                 f"{BEFORE} tasks to run on the primary")  # fmt: skip
        start = time.time()
        pg_server.halt("immediate")
        time.sleep(READ_ONLY_SECONDS)
        replica.promote()
        wait_for(lambda: _writable(broker.store), TIMEOUT, "the promoted replica to take writes")
        faults.windows.append(Window(start, time.time(), crash=True))
        resumed = len(producer.published)
        wait_for(lambda: len(producer.published) >= resumed + AFTER, TIMEOUT,
                 f"{AFTER} publishes after the failover",
                 show=lambda: producer.failed[-3:])  # fmt: skip
    finally:
        producer.stop()
    failed = [t for t, _ in producer.failed]
    settled = settle(broker, producer.published, failed, timeout=TIMEOUT)
    counts = count(broker, producer.published, failed, faults)
    print(counts.line(f"failover to a synchronous replica, {READ_ONLY_SECONDS:.0f}s read-only"))

    assert worker.proc.poll() is None, f"the worker exited:\n{worker.tail()}"
    assert settled, f"the queue did not drain after the failover:\n{worker.tail()}"
    # Every publish that returned (acknowledged to the producer) ran, and its
    # message was neither dead-lettered nor dropped.
    assert counts.lost == [], counts.lost[:10]
    assert counts.unexplained == [], counts.unexplained[:3]
    # The last task ran on the same worker process, against the new primary.
    last = broker.events(producer.published[-1])
    assert any(f":{worker.proc.pid}:" in getattr(r.event, "consumer", "") for r in last)
