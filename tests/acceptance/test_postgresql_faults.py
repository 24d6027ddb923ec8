"""Database faults with real workers: PostgreSQL restarts and outages in the middle
of a run, and a database that is down when the worker starts (issue #3, item 8).

Every test runs a throwaway PostgreSQL server of its own (:mod:`pgserver`), never
the machine's, because it stops and restarts it.  The server keeps every commit it
acknowledged across a crash (``synchronous_commit`` on), so what a test sees lost
was lost by the transport, not by the test set-up.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu.exceptions
import pytest
import resultproj
import sqlalchemy as sa
from celery.app.trace import trace_task
from harness import Broker, Producer, Worker, open_broker, wait_for
from pgserver import EmbeddedPostgres

from celery_eventstore import lifecycle as lc
from celery_eventstore.exceptions import DatabaseUnavailable
from celery_eventstore.storage import redact

#: A publish every PUBLISH_INTERVAL s of a task that runs TASK_SECONDS: with two
#: pool processes the worker keeps up, and some tasks are always running.
PUBLISH_INTERVAL = 0.05
TASK_SECONDS = 0.05
#: Tasks that must have run before the fault, and been published after it.
BEFORE, AFTER = 15, 15
#: Generous: a loaded 2-core machine, Celery's reconnect back-off, lease expiries.
TIMEOUT = 60.0


@pytest.fixture
def broker(
    request: pytest.FixtureRequest, tmp_path: Path, pg_server: EmbeddedPostgres
) -> Iterator[Broker]:
    # No reaper: the workers stop before their server goes.
    yield from open_broker(request, tmp_path, None, pg_server.url)


def _ran(broker: Broker, task_ids: list[str]) -> int:
    return sum(1 for t in task_ids if broker.runs(t))


def _reconnected(worker: Worker) -> bool:
    """The worker saw the fault and came back: Celery's consumer lost the broker and
    connected again, or -- when no claim was in flight, and pooled connections the
    server closed were replaced as they were taken -- only the process's LISTEN
    connection was cut, and it connected again by itself."""
    log = worker.log()
    celery = "Connection to broker lost" in log and log.count("Connected to eventstore+") >= 2
    return celery or "lost the LISTEN connection, connecting again" in log


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault, task",
    [
        ("restart-fast", "proj.plain"),
        ("restart-fast", "proj.late"),
        ("restart-immediate", "proj.plain"),
        ("restart-immediate", "proj.late"),
        ("outage", "proj.late"),
    ],
)
def test_worker_and_producer_survive_a_fault(
    broker: Broker, pg_server: EmbeddedPostgres, start_worker: Any, fault: str, task: str
) -> None:
    """``restart-*``: ``pg_ctl restart -m fast|immediate`` while a producer publishes
    and the worker runs tasks.  ``outage``: the server crashes and stays down until
    a publish has failed and the worker has retried its connection."""
    # A server crash (-m immediate) loses commits made with synchronous_commit off,
    # which async_commit uses for claims and acks: a lost claim reruns its task
    # with no trace in the history (docs/guarantees.rst).  Test the strict setting.
    broker.options["async_commit"] = fault == "restart-fast"
    worker = start_worker()
    producer = Producer(broker.app, task, {"sleep": TASK_SECONDS}, PUBLISH_INTERVAL)
    producer.start()
    try:
        wait_for(lambda: _ran(broker, producer.published) >= BEFORE, TIMEOUT,
                 f"{BEFORE} tasks to run before the fault")  # fmt: skip
        if fault == "outage":
            pg_server.halt("immediate")
            wait_for(lambda: producer.failed and "Trying again in" in worker.log(), TIMEOUT,
                     "a failed publish and a connection retry of the worker")  # fmt: skip
            pg_server.resume()
        else:
            pg_server.restart(fault.split("-")[1])
        resumed = len(producer.published)
        wait_for(lambda: len(producer.published) >= resumed + AFTER, TIMEOUT,
                 f"{AFTER} publishes after the fault", show=lambda: producer.failed)  # fmt: skip
    finally:
        producer.stop()
    published = producer.published
    failed = [t for t, _ in producer.failed]
    wait_for(lambda: _ran(broker, published) == len(published), TIMEOUT,
             "every published task to run",
             show=lambda: [t for t in published if not broker.runs(t)])  # fmt: skip

    # The worker reconnected by itself, and that same process ran the tasks
    # published after the fault.
    assert worker.proc.poll() is None, "the worker died"
    assert _reconnected(worker), "the worker never lost and regained the broker"
    last = broker.events(published[-1])
    claims = [r.event for r in last if isinstance(r.event, lc.Claimed)]
    assert claims and f":{worker.proc.pid}:" in claims[-1].consumer

    # Every published task ran once; a second run only after its lease ran out.
    for task_id in published:
        runs, types = broker.runs(task_id), broker.types(task_id)
        assert 1 <= len(runs) <= 1 + types.count("LeaseExpired"), (task_id, runs, types)
    # A publish that failed may still have committed (the error came with the
    # commit in flight): it ran at most once.
    for task_id in failed:
        assert len(broker.runs(task_id)) <= 1, (task_id, broker.runs(task_id))

    # What a failed producer saw, once Celery's publish retries were used up:
    # kombu's OperationalError, which Celery raises for a broker connection
    # error, with the store's message.
    if fault == "outage":
        assert failed, "no publish failed while the server was down"
    for task_id, exc in producer.failed:
        assert isinstance(exc, kombu.exceptions.OperationalError), (task_id, repr(exc))
        assert isinstance(exc.__cause__, DatabaseUnavailable), (task_id, repr(exc.__cause__))
        assert f"database {redact(sa.make_url(broker.db_url))} is unavailable" in str(exc)


@pytest.mark.slow
def test_worker_started_while_the_database_is_down_retries_then_works(
    broker: Broker, pg_server: EmbeddedPostgres
) -> None:
    pg_server.halt("fast")
    worker = Worker(broker, f"down-{uuid.uuid4().hex[:6]}", [])
    broker.workers.append(worker)

    # Celery's start-up retry (broker_connection_retry_on_startup), not a crash.
    wait_for(lambda: worker.log().count("Trying again in") >= 2, TIMEOUT,
             "the worker to retry its broker connection twice",
             show=worker.tail)  # fmt: skip
    assert worker.proc.poll() is None, worker.tail()
    assert "Cannot connect to eventstore+postgresql" in worker.log()
    assert " ready." not in worker.log()

    pg_server.resume()
    worker.wait_ready()
    task_id = broker.app.tasks["proj.plain"].apply_async().id
    broker.wait_for_runs(task_id, ["ran"], timeout=TIMEOUT)
    broker.wait_for_event(task_id, "Acked", timeout=TIMEOUT)


@pytest.mark.slow
def test_results_survive_a_restart(
    broker: Broker, pg_server: EmbeddedPostgres, start_worker: Any
) -> None:
    """``AsyncResult.get()`` before and after a restart, from the same thread (its
    LISTEN connection) against the same worker (its pool processes' connections)."""
    start_worker("-c", "1", app="resultproj")
    app = resultproj.make_app(broker.url, broker.transport_options())
    try:
        add = app.tasks["resultproj.add"]
        assert add.delay(1, 2).get(timeout=TIMEOUT) == 3
        pg_server.restart("fast")
        assert add.delay(3, 4).get(timeout=TIMEOUT) == 7
        assert add.delay(5, 6).get(timeout=TIMEOUT) == 11
    finally:
        backend = getattr(app._local, "backend", None)
        listener = getattr(getattr(backend, "_local", None), "listener", None)
        if listener is not None:
            listener.close()
        app.pool.force_close_all()
        app.close()


@pytest.mark.parametrize("always_retry", [False, True])
def test_result_backend_retries_only_when_asked(
    broker: Broker, pg_server: EmbeddedPostgres, always_retry: bool
) -> None:
    """With Celery's ``result_backend_always_retry`` a result read waits out an
    outage; without it, the read fails at once with the store's error."""
    app = resultproj.make_app(broker.url, broker.transport_options())
    app.conf.update(result_backend_always_retry=always_retry,
                    result_backend_max_sleep_between_retries_ms=500)  # fmt: skip
    try:
        task_id = uuid.uuid4().hex
        app.backend.store_result(task_id, 42, "SUCCESS")
        pg_server.halt("fast")
        if not always_retry:
            with pytest.raises(DatabaseUnavailable):
                app.backend.get_task_meta(task_id, cache=False)
            pg_server.resume()
            return
        # The server comes back while the read is retrying.
        comeback = threading.Timer(2.0, pg_server.resume)
        comeback.start()
        try:
            meta = app.backend.get_task_meta(task_id, cache=False)
        finally:
            comeback.join()
        assert (meta["status"], meta["result"]) == ("SUCCESS", 42)
    finally:
        app.close()


def test_a_task_runs_when_its_started_state_cannot_be_written(
    broker: Broker, pg_server: EmbeddedPostgres
) -> None:
    """The server is down when a worker records STARTED (``task_track_started``):
    the task must still run.  A failed STARTED write used to make Celery record a
    FAILURE (``DatabaseUnavailable``) for a task that never ran, and the transport
    then settled its redelivery as finished: the task was lost (seen in the fault
    suite's crash test).  Celery's own tracer runs the task here, as a pool process
    does; its body brings the server back, so its result is written."""
    app = resultproj.make_app(broker.url, broker.transport_options())
    ran: list[str] = []

    @app.task(name="resultproj.revive", shared=False, bind=True, acks_late=True)
    def revive(self: Any) -> str:
        ran.append(self.request.id)
        pg_server.resume()
        return "ran"

    try:
        app.finalize()
        assert revive.track_started
        task_id = uuid.uuid4().hex
        pg_server.halt("fast")
        # What a pool process runs: its own failures become an "internal error".
        retval, info, _, _ = trace_task(
            revive, task_id, (), {}, {"id": task_id, "delivery_info": {}}, app=app
        )
        assert ran == [task_id], f"the task never ran: {info and info.state} {retval!r}"
        assert (info.state if info else "SUCCESS", retval) == ("SUCCESS", "ran")
        stream = [r.type for r in broker.store.read_stream(task_id)]
        assert stream == ["Succeeded"]
        assert app.AsyncResult(task_id).get(timeout=TIMEOUT) == "ran"
    finally:
        if not (pg_server.data / "postmaster.pid").exists():
            pg_server.resume()
        app.close()
