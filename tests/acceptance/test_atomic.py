"""Atomic enqueue (invariant 1: enqueue iff commit) with real client processes,
on SQLite and on PostgreSQL.  No worker runs: the jobs stay in the queue, so the
queue projection can be compared with the business table too."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from enqueuer import TASK, business_engine, business_table, job_id
from harness import HERE, Broker, wait_for
from sqlalchemy.orm import Session

from celery_eventstore import atomic
from celery_eventstore.enqueue import AtomicEnqueueError

CLIENTS = 6
ITERATIONS = 40
#: Clients killed (and replaced by one that runs REPLACEMENT_ITERATIONS) per run.
KILLS = 4
REPLACEMENT_ITERATIONS = 20
#: How long the clients may take to finish once the killing stops.
FINISH_TIMEOUT = 90.0

# -- helpers ----------------------------------------------------------------------


def _all_events(broker: Broker) -> list[Any]:
    out: list[Any] = []
    after = 0
    while True:
        page = broker.store.read_all(after=after, limit=1000)
        if not page:
            return out
        out.extend(page)
        after = page[-1].position


def _published_streams(broker: Broker, prefix: str = "job-") -> Counter[str]:
    """How many Published events each stream starting with ``prefix`` has."""
    return Counter(
        r.stream
        for r in _all_events(broker)
        if r.type == "Published" and r.stream.startswith(prefix)
    )


def _message_streams(broker: Broker, prefix: str = "job-") -> Counter[str]:
    """Queue rows (the ``messages`` projection) per stream starting with ``prefix``."""
    msgs = broker.store.tables.messages
    with broker.store.engine.connect() as conn:
        rows = conn.execute(sa.select(msgs.c.stream_id)).scalars().all()
    return Counter(s for s in rows if s.startswith(prefix))


def _rows(engine: sa.Engine, table: sa.Table) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.select(table.c.id)).scalars())


@pytest.fixture
def app(current_result_app: Any) -> Any:
    return current_result_app


@pytest.fixture
def business(broker: Broker) -> Iterator[tuple[sa.Engine, sa.Table]]:
    """The application's table in the broker's database (the test's schema on PostgreSQL)."""
    engine = business_engine(broker.db_url)
    table = business_table(broker.schema)
    table.metadata.create_all(engine)
    yield engine, table
    engine.dispose()


# -- enqueue iff commit, with processes killed at random ---------------------------


class Client:
    def __init__(
        self, broker: Broker, n: int, seed: int, warm_up: bool, iterations: int = ITERATIONS
    ) -> None:
        self.prefix = f"c{n}"
        self.log_path = broker.tmp_path / f"enqueuer-{self.prefix}.log"
        self.err_path = broker.tmp_path / f"enqueuer-{self.prefix}.err"
        config = {
            "broker_url": broker.url,
            "options": broker.transport_options(),
            "db_url": broker.db_url,
            "schema": broker.schema,
            "prefix": self.prefix,
            "iterations": iterations,
            "seed": seed,
            "log": str(self.log_path),
            "warm_up": warm_up,
        }
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "enqueuer", json.dumps(config)],
                cwd=HERE,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=subprocess.STDOUT,
            )
        self.killed = False

    def lines(self) -> list[str]:
        if not self.log_path.exists():
            return []
        return self.log_path.read_text().splitlines()

    def working(self) -> bool:
        """Started its loop, not finished it, still alive."""
        lines = self.lines()
        return self.proc.poll() is None and "ready" in lines and "done" not in lines

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.killed = True


def _ids(clients: list[Client], what: str) -> set[str]:
    return {
        line.split(" ", 1)[1] for c in clients for line in c.lines() if line.startswith(what + " ")
    }


def test_enqueue_iff_commit_with_clients_killed_at_random(
    broker: Broker, business: tuple[sa.Engine, sa.Table]
) -> None:
    engine, table = business
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    # No warm-up publish outside a transaction: each client's first publish is
    # inside atomic(), as an application's would be.
    warm = False
    clients = [Client(broker, n, seed + n, warm) for n in range(CLIENTS)]
    try:
        kills = 0
        deadline = time.monotonic() + 60
        while kills < KILLS and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.05, 0.4))
            working = [c for c in clients if c.working()]
            if not working:
                if all(c.proc.poll() is not None for c in clients):
                    break  # everyone finished before we were done killing
                continue
            rng.choice(working).kill()
            kills += 1
            n = len(clients)
            clients.append(Client(broker, n, seed + n, warm, REPLACEMENT_ITERATIONS))

        def finished() -> bool:
            return all(c.proc.poll() is not None for c in clients)

        wait_for(finished, FINISH_TIMEOUT, "the enqueuer processes to finish", interval=0.2)
    finally:
        for c in clients:
            if c.proc.poll() is None:
                c.kill()

    failed = {
        c.prefix: c.err_path.read_text() for c in clients if not c.killed and c.proc.returncode
    }
    assert not failed, f"enqueuer processes failed (seed {seed}): {failed}"
    assert kills >= 1, "no client was killed during its run"

    committed_rows = _rows(engine, table)
    published = _published_streams(broker)
    queued = _message_streams(broker)
    logged_published = _ids(clients, "published")
    logged_committed = _ids(clients, "committed")
    logged_rolled_back = _ids(clients, "rolledback")
    in_doubt = logged_published - logged_committed - logged_rolled_back

    # The exercise did what it should: commits, rollbacks, kills.
    assert logged_committed and logged_rolled_back, (seed, len(logged_committed))
    assert logged_committed <= committed_rows, "a commit that returned did not stick"
    assert not (logged_rolled_back & committed_rows)

    expected_jobs = {job_id(r) for r in committed_rows}
    assert set(published) == expected_jobs, {
        "seed": seed,
        "jobs without a committed row": sorted(set(published) - expected_jobs),
        "committed rows without a job": sorted(expected_jobs - set(published)),
    }
    assert set(published.values()) == {1}, {s: n for s, n in published.items() if n != 1}
    # No worker runs: every committed job, and nothing else, waits in the queue.
    assert queued == published, {
        "queue rows without a job": sorted(set(queued) - set(published)),
        "jobs without a queue row": sorted(set(published) - set(queued)),
    }
    assert not ({job_id(r) for r in logged_rolled_back} & set(queued))
    print(
        f"\nseed {seed}: {len(clients)} clients, {kills} killed; "
        f"{len(committed_rows)} committed, {len(logged_rolled_back)} rolled back, "
        f"{len(in_doubt)} in flight when killed "
        f"({len(in_doubt & committed_rows)} of them committed)"
    )


# -- the checks atomic() makes -------------------------------------------------------


def _other_database(broker: Broker, tmp_path: Path) -> str:
    if broker.dialect == "sqlite":
        return f"sqlite:///{tmp_path / 'other.db'}"
    return sa.make_url(broker.db_url).set(database="postgres").render_as_string(hide_password=False)


def test_atomic_on_another_database_raises(broker: Broker, app: Any, tmp_path: Path) -> None:
    other = sa.create_engine(_other_database(broker, tmp_path))
    task_id = f"job-{uuid.uuid4().hex}"
    try:
        with other.connect() as conn, conn.begin():
            conn.execute(sa.text("SELECT 1"))
            with pytest.raises(AtomicEnqueueError, match="same database"):
                with atomic(conn):
                    app.send_task(TASK, task_id=task_id)
    finally:
        other.dispose()
    assert broker.events(task_id) == []
    assert _message_streams(broker) == Counter()


def test_atomic_without_a_transaction_raises(broker: Broker, app: Any) -> None:
    engine = sa.create_engine(broker.db_url)
    task_id = f"job-{uuid.uuid4().hex}"
    try:
        with engine.connect() as conn:
            assert not conn.in_transaction()
            with pytest.raises(AtomicEnqueueError, match="no open transaction"):
                with atomic(conn):
                    app.send_task(TASK, task_id=task_id)
    finally:
        engine.dispose()
    assert broker.events(task_id) == []
    assert _message_streams(broker) == Counter()


def test_atomic_with_a_session_commits_and_rolls_back(
    broker: Broker, app: Any, business: tuple[sa.Engine, sa.Table]
) -> None:
    engine, table = business

    with Session(engine) as session, session.begin():
        session.execute(table.insert().values(id="s-commit"))
        with atomic(session):
            app.send_task(TASK, task_id=job_id("s-commit"))

    with Session(engine) as session:
        session.execute(table.insert().values(id="s-rollback"))
        with atomic(session):
            app.send_task(TASK, task_id=job_id("s-rollback"))
        session.rollback()

    class Boom(Exception):
        pass

    with pytest.raises(Boom), Session(engine) as session, session.begin():
        session.execute(table.insert().values(id="s-raised"))
        with atomic(session):
            app.send_task(TASK, task_id=job_id("s-raised"))
        raise Boom()

    assert _rows(engine, table) == {"s-commit"}
    assert _published_streams(broker) == Counter({job_id("s-commit"): 1})
    assert _message_streams(broker) == Counter({job_id("s-commit"): 1})
    assert broker.events(job_id("s-rollback")) == []
    assert broker.events(job_id("s-raised")) == []


def test_first_publish_of_a_process_inside_atomic(
    request: pytest.FixtureRequest, broker: Broker, business: tuple[sa.Engine, sa.Table]
) -> None:
    """The documented pattern in a fresh process: write, then publish in atomic()."""
    engine, table = business
    client = Client(broker, 0, 0, warm_up=False, iterations=1)
    try:
        wait_for(
            lambda: client.proc.poll() is not None or "ready" in client.lines(),
            30,
            "the enqueuer process to start",
        )
        # Once the process is up, a publish takes milliseconds, not seconds.
        wait_for(
            lambda: client.proc.poll() is not None,
            5,
            "the first atomic publish of a fresh process",
            show=lambda: client.lines(),
        )
    finally:
        client.kill()
    assert client.proc.returncode == 0, client.err_path.read_text()
    assert client.lines()[-1] == "done"
    rows = _rows(engine, table)
    assert set(_published_streams(broker)) == {job_id(r) for r in rows}


# -- a DB-API connection (psycopg2, psycopg 3, sqlite3) -------------------------------


def _dbapi_connections(broker: Broker) -> Iterator[tuple[str, Any]]:
    """The application's own connection to the broker's database, by each driver."""
    url = sa.make_url(broker.db_url)
    if broker.dialect == "sqlite":
        import sqlite3

        yield "sqlite3", sqlite3.connect(url.database, timeout=30)
        return
    for name in ("psycopg2", "psycopg"):
        driver = __import__(name)
        yield name, driver.connect(
            host=url.host, port=url.port, user=url.username, dbname=url.database
        )


def test_atomic_with_a_dbapi_connection(
    broker: Broker, app: Any, business: tuple[sa.Engine, sa.Table]
) -> None:
    engine, table = business
    name = f"{broker.schema}.{table.name}" if broker.schema else table.name
    expected: set[str] = set()
    for driver, conn in _dbapi_connections(broker):
        try:
            cur = conn.cursor()
            for outcome in ("commit", "rollback"):
                row = f"{driver}-{outcome}"
                cur.execute(f"INSERT INTO {name} (id) VALUES ('{row}')")
                with atomic(conn):
                    app.send_task(TASK, task_id=job_id(row))
                getattr(conn, outcome)()
            expected.add(f"{driver}-commit")

            if driver == "sqlite3":
                conn.isolation_level = None
            else:
                conn.autocommit = True
            with pytest.raises(AtomicEnqueueError, match="autocommit"):
                with atomic(conn):
                    app.send_task(TASK, task_id=job_id(f"{driver}-autocommit"))

            if driver != "sqlite3":  # a PostgreSQL transaction that failed
                conn.autocommit = False
                with pytest.raises(Exception):  # noqa: B017 - the driver's own error
                    cur.execute("SELECT no_such_column FROM no_such_table")
                with pytest.raises(AtomicEnqueueError, match="failed transaction"):
                    with atomic(conn):
                        app.send_task(TASK, task_id=job_id(f"{driver}-failed"))
                conn.rollback()
        finally:
            conn.close()
    assert _rows(engine, table) == expected
    assert _published_streams(broker) == Counter({job_id(r): 1 for r in expected})
    assert _message_streams(broker) == _published_streams(broker)
