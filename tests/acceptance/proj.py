"""The Celery application the acceptance tests run in real workers (``celery -A proj``).

The worker process reads its broker from the environment (see the ``*_ENV`` names
below); the test process builds its own app with :func:`make_app` and the same
task names.  There is no result backend: a task tells the test that it ran by
appending a JSON line to a marker file in the directory named by ``MARKERS_ENV``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from celery import Celery, Task

BROKER_ENV = "ACCEPTANCE_BROKER_URL"
OPTIONS_ENV = "ACCEPTANCE_TRANSPORT_OPTIONS"
MARKERS_ENV = "ACCEPTANCE_MARKER_DIR"

#: Marker file shared by every run of ``proj.ordered`` (the execution order).
SEQUENCE = "sequence"


def record(name: str, **fields: Any) -> None:
    """Append one JSON line to the marker file ``name``."""
    line = json.dumps({"pid": os.getpid(), "time": time.time(), **fields})
    with open(os.path.join(os.environ[MARKERS_ENV], name), "a") as out:
        out.write(line + "\n")


def runs(name: str) -> list[dict[str, Any]]:
    """The lines of the marker file ``name`` (none if it does not exist)."""
    path = os.path.join(os.environ[MARKERS_ENV], name)
    if not os.path.exists(path):
        return []
    with open(path) as lines:
        return [json.loads(line) for line in lines if line.strip()]


def seen(name: str) -> bool:
    """Whether the marker file ``name`` exists."""
    return os.path.exists(os.path.join(os.environ[MARKERS_ENV], name))


def go_file(task_id: str) -> str:
    """The marker file a test creates to let a task that waits for it finish."""
    return f"go-{task_id}"


def wait_for_go(task_id: str, timeout: float = 30.0) -> None:
    """Block (in a task) until the test creates the task's :func:`go_file`."""
    path = os.path.join(os.environ[MARKERS_ENV], go_file(task_id))
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError("the test never let the task finish")
        time.sleep(0.05)


class DiesAfterItsResult(Task):  # type: ignore[misc]
    """A task class whose first run kills its whole worker (the process group) once
    the task has returned and its result is stored, before its ack is written."""

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        if not seen(f"killed-{task_id}"):
            record(f"killed-{task_id}")
            os.killpg(os.getpgrp(), signal.SIGKILL)


def base_app(
    name: str, broker_url: str, transport_options: dict[str, Any], *, current: bool = False,
    results: bool = False, **conf: Any,
) -> Celery:
    """A test application on ``broker_url``; with ``results`` the event store is its
    result backend too (a placeholder in a bare import, where the URL is not one)."""
    app = Celery(name, set_as_current=current)
    app.conf.update(
        broker_url=broker_url,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
    )
    if results:
        app.conf.update(
            result_backend=(
                broker_url if broker_url.startswith("eventstore+") else "cache+memory://"
            ),
            result_backend_transport_options=transport_options,
            task_track_started=True,
        )
    app.conf.update(conf)
    return app


def make_app(
    broker_url: str, transport_options: dict[str, Any], *, current: bool = False
) -> Celery:
    app = base_app("proj", broker_url, transport_options, current=current)

    @app.task(name="proj.plain", shared=False, bind=True)
    def plain(self: Any, sleep: float = 0) -> None:
        record(
            self.request.id, event="ran", redelivered=self.request.delivery_info.get("redelivered")
        )
        time.sleep(sleep)

    @app.task(name="proj.late", shared=False, bind=True, acks_late=True)
    def late(self: Any, sleep: float = 0) -> None:
        """``proj.plain`` acked after it ran."""
        record(
            self.request.id, event="ran", redelivered=self.request.delivery_info.get("redelivered")
        )
        time.sleep(sleep)

    @app.task(name="proj.retrying", shared=False, bind=True)
    def retrying(self: Any, times: int) -> None:
        record(self.request.id, event="ran", retries=self.request.retries)
        if self.request.retries < times:
            raise self.retry(countdown=1, max_retries=times)

    @app.task(name="proj.hold", shared=False, bind=True, acks_late=True)
    def hold(self: Any, seconds: float) -> None:
        """Sleeps ``seconds`` on its first run only; later runs return at once."""
        first = not seen(self.request.id)
        record(
            self.request.id,
            event="started",
            redelivered=bool(self.request.delivery_info.get("redelivered")),
        )
        if first:
            time.sleep(seconds)
        record(self.request.id, event="done")

    @app.task(
        name="proj.kill_pool_process", shared=False, bind=True, acks_late=True,
        reject_on_worker_lost=True,
    )
    def kill_pool_process(self: Any) -> None:
        """Kills the pool process running it; Celery then requeues its message
        (``reject_on_worker_lost``).  Only meaningful on the prefork pool."""
        record(self.request.id, event="ran")
        os.kill(os.getpid(), signal.SIGKILL)

    @app.task(
        name="proj.finish_then_die", shared=False, bind=True, acks_late=True,
        base=DiesAfterItsResult,
    )
    def finish_then_die(self: Any) -> str:
        record(self.request.id, event="ran")
        return "done"

    @app.task(name="proj.ordered", shared=False, bind=True)
    def ordered(self: Any, n: int) -> None:
        record(SEQUENCE, n=n, id=self.request.id)

    return app


app = make_app(
    os.environ.get(BROKER_ENV, "memory://"),
    json.loads(os.environ.get(OPTIONS_ENV) or "{}"),
    current=True,
)
