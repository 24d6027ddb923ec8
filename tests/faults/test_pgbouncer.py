"""Producers, workers, the result backend and the CLI through a real PgBouncer in
transaction pooling mode (issue 11, item 1).

PgBouncer hands each transaction to whichever server connection is free, so
nothing may rely on session state: durability is set per transaction, advisory
locks are transaction-scoped, and the store prepares no statement on a
connection it finds reaching a pooler (its URLs here say nothing of
``prepare_threshold``).  LISTEN cannot work through it: wake-ups come through
``listen_url``, a connection straight to the server.

Each test starts a private PostgreSQL (:func:`pg_server`) and a PgBouncer of its
own in front of it (:mod:`pgbouncer`), on free ports.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import chord
from harness import Broker, Worker, open_broker, wait_for
from pgbouncer import PgBouncer
from pgserver import EmbeddedPostgres
from tally import Faults, count, finished, settle

from celery_eventstore import lifecycle as lc
from celery_eventstore.storage import EventStore, NewMessage

#: Long enough that a task reached within it was woken, not found by the poll.
SLOW_POLL = 8.0
TIMEOUT = 60.0


@pytest.fixture
def bouncer(pg_server: EmbeddedPostgres) -> Iterator[PgBouncer]:
    b = PgBouncer.start(pg_server, pool_size=4)
    try:
        yield b
    finally:
        b.stop()


def bounced_url(bouncer: PgBouncer, driver: str) -> str:
    return bouncer.url(driver)


@pytest.fixture(params=["psycopg2", "psycopg"])
def broker(
    request: pytest.FixtureRequest, tmp_path: Path, pg_server: EmbeddedPostgres,
    bouncer: PgBouncer,
) -> Iterator[Broker]:
    """A broker whose every connection goes through PgBouncer, but for the LISTEN
    connection (``listen_url``, straight to the server)."""
    driver = request.param
    for b in open_broker(request, tmp_path, None, bounced_url(bouncer, driver)):
        b.options["listen_url"] = pg_server.url.replace("psycopg2", driver)
        yield b


def test_a_relaxed_transaction_never_leaks_into_the_next_clients(
    pg_server: EmbeddedPostgres,
) -> None:
    """Through one shared server connection, a relaxed transaction (claims, acks)
    commits without waiting for the disk, and the next client's durable one --
    another store, another driver, the same server session -- waits again."""
    one = PgBouncer.start(pg_server, pool_size=1)
    relaxed = EventStore(bounced_url(one, "psycopg2"))
    durable = EventStore(bounced_url(one, "psycopg"))
    try:
        relaxed.migrate()

        def setting(conn: Any) -> tuple[int, str]:
            row = conn.exec_driver_sql(
                "SELECT pg_backend_pid(), current_setting('synchronous_commit')"
            ).one()
            return int(row[0]), str(row[1])

        with relaxed._write(durable=False) as conn:
            server, mode = setting(conn)
            assert mode == "off"
        for store in (durable, relaxed):
            with store._write() as conn:
                assert setting(conn) == (server, "on")
        # A relaxed transaction that rolls back leaks nothing either.
        with pytest.raises(RuntimeError), relaxed._write(durable=False) as conn:
            assert setting(conn) == (server, "off")
            raise RuntimeError("roll back")
        with durable._write() as conn:
            assert setting(conn) == (server, "on")
        # Publishes are durable; claims relaxed; both work through the pooler.
        durable.publish([NewMessage(stream="s", queue="q", message={})])
        (claimed,) = relaxed.claim(["q"], 1, "w", 10)
        relaxed.ack([claimed.ref])
        assert [r.type for r in durable.read_stream("s")] == ["Published", "Claimed", "Acked"]
    finally:
        relaxed.close()
        durable.close()
        one.stop()


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_a_store_reaching_a_pooler_prepares_no_statement(
    pg_server: EmbeddedPostgres, driver: str
) -> None:
    """Straight to the server both drivers prepare a statement after five runs;
    through PgBouncer's transaction pooling, where the next transaction may run on
    another server session that never saw the PREPARE, the store finds the pooler
    and prepares nothing, unless the URL asks (``prepare_threshold``)."""
    one = PgBouncer.start(pg_server, pool_size=1)  # one server session sees all
    stores = {
        "default": EventStore(bounced_url(one, driver)),
        "asked": EventStore(sa.make_url(bounced_url(one, "psycopg2")).update_query_dict(
            {"prepare_threshold": "0"})),
    }
    probe = sa.create_engine(one.url(), poolclass=sa.pool.NullPool)

    def prepared_on_the_server() -> int:
        with probe.connect() as conn:
            return int(conn.exec_driver_sql(
                "SELECT count(*) FROM pg_prepared_statements").scalar_one())

    def cycles(store: EventStore, tag: str) -> None:
        for n in range(8):  # more runs of each statement than the default threshold
            stream = f"{tag}-{n}"
            store.publish([NewMessage(stream=stream, queue="q", message={"n": n})])
            (claimed,) = store.claim(["q"], 1, "w", 30)
            store.execute(stream, lc.Succeed(result={"r": n}, claim=claimed.ref.claim))
            assert store.ack([claimed.ref]) == {claimed.delivery: "done"}

    try:
        stores["default"].migrate()
        cycles(stores["default"], "default")
        assert not stores["default"].db.dialect.prepares
        assert stores["default"].statement_preparing() == (
            "not prepared: connections reach a pooler (prepare_threshold decides)")
        assert prepared_on_the_server() == 0
        cycles(stores["asked"], "asked")  # psycopg2 asked to prepare: it does
        assert prepared_on_the_server() > 0
    finally:
        for store in stores.values():
            store.close()
        probe.dispose()
        one.stop()


def test_tasks_results_retries_and_chords_through_pgbouncer(
    broker: Broker, start_worker: Any, result_app: Any, pg_server: EmbeddedPostgres
) -> None:
    """A worker and a producer through PgBouncer: tasks run once and are acked,
    results come back, a retry runs again, a chord's callback fires once.  With
    the safety-net poll slowed to ``SLOW_POLL`` s, back-to-back tasks finishing
    faster than one poll prove the wake-ups arrive through ``listen_url``."""
    broker.options["polling_interval"] = SLOW_POLL
    start_worker(app="resultproj")
    app = result_app
    add, tsum = app.tasks["resultproj.add"], app.tasks["resultproj.tsum"]
    started = time.monotonic()
    ids = []
    for n in range(5):
        result = add.delay(n, 1)
        assert result.get(timeout=TIMEOUT) == n + 1
        ids.append(result.id)
    assert time.monotonic() - started < SLOW_POLL, "tasks waited for the poll: no wake-ups"
    # The result backend listens where it is told, not through the pooler (where
    # LISTEN cannot work): its waits are woken, not left to their poll.
    assert app.backend.store.listen_engine.url.port == sa.make_url(pg_server.url).port
    for task_id in ids:
        broker.wait_for_event(task_id, "Acked")
        types = broker.types(task_id)
        assert types.count("Claimed") == 1 and types.count("Succeeded") == 1, types

    retried = app.tasks["resultproj.retrying"].delay(1)
    assert retried.get(timeout=TIMEOUT) == 1
    assert broker.types(retried.id).count("RetryScheduled") == 1

    callback = chord([add.s(n, n) for n in range(4)])(tsum.s())
    assert callback.get(timeout=TIMEOUT) == 12
    assert broker.wait_for_event(callback.id, "Succeeded").count("Claimed") == 1


def test_the_cli_works_through_pgbouncer(broker: Broker) -> None:
    broker.store.publish([NewMessage(stream="cli", queue="cliq", message={})])
    assert broker.schema is not None
    base = [sys.executable, "-m", "celery_eventstore.cli", "--url", broker.db_url,
            "--schema", broker.schema]  # fmt: skip
    for command in (["migrate"], ["queues"], ["history", "cli"]):
        done = subprocess.run(
            [*base, *command], capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
        assert done.returncode == 0, (command, done.stdout, done.stderr)
    queues = subprocess.run([*base, "queues"], capture_output=True, text=True, check=True)
    assert "cliq" in queues.stdout
    check = subprocess.run([*base, "check"], capture_output=True, text=True, check=False)
    assert ("statements not prepared: connections reach a pooler (prepare_threshold decides)"
            in check.stdout.splitlines()), check.stdout


@pytest.mark.slow
def test_kill_9_redelivery_through_pgbouncer(
    broker: Broker, start_worker: Any, result_app: Any
) -> None:
    """Workers killed with SIGKILL mid-drain, every connection through PgBouncer:
    their claims come back after the lease and nothing is lost."""
    broker.options["visibility_timeout"] = 3
    effect = result_app.tasks["resultproj.effect"]
    published = [effect.apply_async(kwargs={"sleep": 0.02}).id for _ in range(400)]
    faults = Faults()
    workers: list[Worker] = [start_worker(app="resultproj") for _ in range(2)]
    for kill, due in enumerate((100, 250), start=1):
        wait_for(lambda due=due: finished(broker, published) >= due, TIMEOUT,
                 f"{due} tasks to finish before kill {kill}")  # fmt: skip
        victim = workers.pop(0)
        victim.kill()
        faults.kills[victim.proc.pid] = time.time()
        workers.append(start_worker(app="resultproj"))
    settle(broker, published, timeout=TIMEOUT * 2)
    counts = count(broker, published, faults=faults)
    print(counts.line("kill-9 x2 through PgBouncer"))
    assert counts.lost == [], counts.lost[:10]
    assert counts.unexplained == [], counts.unexplained[:3]
    redelivered = [
        t for t in published
        if sum(isinstance(r.event, lc.Claimed) for r in broker.events(t)) > 1
    ]
    assert redelivered, "no kill found a claim held: the test proved nothing"
