"""The connections a worker, a producer and a web process hold on PostgreSQL, as
docs/scaling.rst states them (issue 11, item 2).

Each role's connections carry an ``application_name`` of its own (a URL
parameter), and are counted in ``pg_stat_activity``; a connection whose last
statement was LISTEN is the process's listening one.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import resultproj
import sqlalchemy as sa
from harness import Broker, open_broker, wait_for

#: SQLAlchemy's default pool: connections kept open for reuse.
POOL_SIZE = 5
#: What docs/scaling.rst promises for a worker's main process besides its LISTEN
#: connection: the claimer, the lease keeper and the event loop's own writes.
WORKER_MAIN_AT_MOST = 3
#: ... and for each prefork child: one, to write results and states.
PER_CHILD_AT_MOST = 1
WAITERS = 8
TIMEOUT = 60.0


def named(url: str, name: str) -> str:
    return sa.make_url(url).update_query_dict({"application_name": name}).render_as_string(
        hide_password=False
    )


@pytest.fixture
def broker(request: pytest.FixtureRequest, tmp_path: Path, postgresql_url: str) -> Iterator[Broker]:
    """A PostgreSQL broker whose workers' connections are named ``<tag>-worker``."""
    tag = f"fp{uuid.uuid4().hex[:8]}"
    for b in open_broker(request, tmp_path, None, named(postgresql_url, f"{tag}-worker")):
        b.tag = tag  # type: ignore[attr-defined]
        yield b


def held(admin_url: str, name: str) -> tuple[int, int]:
    """(LISTEN connections, all connections) of the application ``name``."""
    engine = sa.create_engine(admin_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT query FROM pg_stat_activity WHERE application_name = :n"),
                {"n": name},
            ).scalars().all()
    finally:
        engine.dispose()
    listening = sum(1 for q in rows if q.upper().startswith(("LISTEN", "UNLISTEN")))
    return listening, len(rows)


def app_named(broker: Broker, postgresql_url: str, role: str) -> Any:
    url = "eventstore+" + named(postgresql_url, f"{broker.tag}-{role}")  # type: ignore[attr-defined]
    return resultproj.make_app(url, broker.transport_options())


def test_worker_producer_and_web_process_connections(
    broker: Broker, start_worker: Any, postgresql_url: str
) -> None:
    tag = broker.tag  # type: ignore[attr-defined]
    producer = app_named(broker, postgresql_url, "producer")
    web = app_named(broker, postgresql_url, "web")
    try:
        # A web process: eight threads wait in AsyncResult.get() for tasks no
        # worker runs yet.
        add = producer.tasks["resultproj.add"]
        pending = [add.delay(n, n) for n in range(WAITERS)]
        results: dict[int, Any] = {}

        def wait(n: int) -> None:
            results[n] = web.AsyncResult(pending[n].id).get(timeout=TIMEOUT)

        threads = [threading.Thread(target=wait, args=(n,)) for n in range(WAITERS)]
        for thread in threads:
            thread.start()
        # The threads' first reads may overflow the pool for a moment ("briefly up
        # to 15 at a peak", docs/scaling.rst); what it keeps is counted once they wait.
        def web_settled() -> bool:
            listening, connections = held(postgresql_url, f"{tag}-web")
            return listening == 1 and connections <= 1 + POOL_SIZE

        wait_for(web_settled, 20, "the web process to LISTEN with its pool's connections",
                 show=lambda: held(postgresql_url, f"{tag}-web"))  # fmt: skip
        web_listen, web_all = held(postgresql_url, f"{tag}-web")
        producer_listen, producer_all = held(postgresql_url, f"{tag}-producer")

        worker = start_worker("-c", "2", app="resultproj")
        for thread in threads:
            thread.join(TIMEOUT)
        assert results == {n: 2 * n for n in range(WAITERS)}
        worker_listen, worker_all = held(postgresql_url, f"{tag}-worker")
        print(
            f"connections: web {web_all} ({web_listen} LISTEN), producer {producer_all} "
            f"({producer_listen} LISTEN), worker -c 2 {worker_all} ({worker_listen} LISTEN)"
        )
        assert web_listen == 1 and web_all <= 1 + POOL_SIZE
        assert producer_listen == 0 and producer_all <= POOL_SIZE
        assert worker_listen == 1
        assert worker_all <= 1 + WORKER_MAIN_AT_MOST + 2 * PER_CHILD_AT_MOST
        assert worker.proc.poll() is None
    finally:
        for app in (producer, web):
            app.pool.force_close_all()
            app.close()
