"""The tour: a real Celery worker on the embedded SQLite store, and the history it left.

``python -m celery_eventstore.demo`` starts ``celery worker`` on a SQLite file,
publishes four kinds of work -- a plain task, a task enqueued atomically with a
business row (and one whose transaction rolls back), a task that fails and
retries, and a task with a countdown -- waits for their results, then prints
each task's history from the event log.  ``--keep DIR`` leaves the database
behind for ``celery-eventstore`` to explore.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from celery import Celery

from . import atomic
from .history import format_timeline, history
from .storage import EventStore

URL_ENV = "CELERY_EVENTSTORE_DEMO_URL"

#: The demo's Celery app: only the two URLs point at the event store.
app = Celery("celery_eventstore.demo")
_url = os.environ.get(URL_ENV, "sqlite:///celery-eventstore-demo.db")
app.conf.update(
    broker_url=f"eventstore+{_url}",
    result_backend=f"eventstore+{_url}",
    task_track_started=True,
    result_extended=True,
    broker_transport_options={"polling_interval": 0.2},
)

orders = sa.Table(
    "demo_orders",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("item", sa.String(100), nullable=False),
)


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(bind=True, max_retries=3)
def flaky(self, succeed_on: int) -> str:  # type: ignore[no-untyped-def]
    """Fails until its ``succeed_on``-th attempt, retrying one second later."""
    if self.request.retries + 1 < succeed_on:
        raise self.retry(exc=ConnectionError("upstream not ready"), countdown=1)
    return f"succeeded on attempt {self.request.retries + 1}"


@app.task
def send_receipt(order_id: int) -> str:
    return f"receipt for order {order_id} sent"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", metavar="DIR", help="keep the SQLite database in DIR")
    args = parser.parse_args(argv)
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="celery-eventstore-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{(workdir / 'jobs.db').resolve()}"
    os.environ[URL_ENV] = url
    app.conf.broker_url = app.conf.result_backend = f"eventstore+{url}"

    store = EventStore(url)
    store.migrate()
    engine = sa.create_engine(url)
    orders.create(engine, checkfirst=True)

    print(f"event store: {url}")
    print(f"starting: celery -A celery_eventstore.demo worker -c 2  (log: {workdir}/worker.log)")
    log = open(workdir / "worker.log", "wb")  # noqa: SIM115 - closed after the worker
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_eventstore.demo", "worker",
         "-c", "2", "-l", "info", "--without-gossip", "--without-mingle",
         "--without-heartbeat"],
        env=dict(os.environ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        results, ghost_id = _publish(engine)
        print(f"rolled back: order 'never' and its job {ghost_id}, which left "
              f"{len(store.read_stream(ghost_id))} events in the log")
        print("waiting for the worker ...")
        for label, result in results:
            value = result.get(timeout=60)
            print(f"  {label:<34} -> {value!r}")
        _show(store, results)
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
        log.close()
        engine.dispose()
        store.close()
    if args.keep:
        print(f"\nThe database stays in {workdir}; try:\n"
              f"  celery-eventstore --url {url} history <task id>")
    return 0


def _publish(engine: sa.Engine) -> tuple[list[tuple[str, Any]], str]:
    results: list[tuple[str, Any]] = []
    results.append(("add(2, 3)", add.delay(2, 3)))

    # The order row and its receipt job commit together ...
    with engine.connect() as conn, conn.begin():
        inserted = conn.execute(orders.insert().values(item="book"))
        order_id = inserted.inserted_primary_key[0]  # type: ignore[index]
        with atomic(conn, app=app):
            results.append((f"send_receipt({order_id}) [atomic]", send_receipt.delay(order_id)))
    # ... and a rolled-back order leaves no job behind.
    with engine.connect() as conn:
        trans = conn.begin()
        conn.execute(orders.insert().values(item="never"))
        with atomic(conn, app=app):
            ghost = send_receipt.delay(-1)
        trans.rollback()

    results.append(("flaky(succeed_on=3)", flaky.delay(3)))
    results.append(("add(40, 2) countdown=2", add.apply_async((40, 2), countdown=2)))
    return results, ghost.id


def _show(store: EventStore, results: list[tuple[str, object]]) -> None:
    time.sleep(0.3)  # let the worker write its last acks
    for label, result in results:
        task_id = getattr(result, "id", "")
        print(f"\n== {label}  task {task_id}")
        print(format_timeline(history(store, task_id)))


if __name__ == "__main__":
    raise SystemExit(main())
