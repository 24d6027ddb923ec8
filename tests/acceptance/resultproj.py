"""The Celery application of the result-backend acceptance tests (``celery -A resultproj``).

Broker *and* result backend are the event store named in the environment (the
same variables as :mod:`proj`), with ``task_track_started`` and
``result_extended`` on.  The test process builds its own app with
:func:`make_app` and the same task names.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from celery import Celery
from proj import (
    BROKER_ENV,
    OPTIONS_ENV,
    DiesAfterItsResult,
    base_app,
    record,
    runs,
    wait_for_go,
)

#: Marker file shared by every run of ``resultproj.effect`` (the fault suite's ledger).
EFFECTS = "effects"


def make_app(
    broker_url: str, transport_options: dict[str, Any], *, current: bool = False
) -> Celery:
    app = base_app(
        "resultproj", broker_url, transport_options, current=current, results=True,
        result_extended=True,
    )

    @app.task(name="resultproj.noop", shared=False)
    def noop() -> None:
        return None

    @app.task(name="resultproj.add", shared=False)
    def add(x: int, y: int = 0) -> int:
        return x + y

    @app.task(name="resultproj.boom", shared=False)
    def boom(n: int) -> None:
        raise ValueError(f"boom {n}")

    @app.task(name="resultproj.retrying", shared=False, bind=True)
    def retrying(self: Any, times: int) -> int:
        if self.request.retries < times:
            raise self.retry(countdown=1, max_retries=times)
        return int(self.request.retries)

    @app.task(name="resultproj.progress", shared=False, bind=True)
    def progress(self: Any) -> str:
        """Reports PROGRESS, then waits for the test's go-ahead file."""
        self.update_state(state="PROGRESS", meta={"step": 1, "of": 2})
        wait_for_go(self.request.id)
        return "done"

    @app.task(name="resultproj.mark", shared=False, bind=True)
    def mark(self: Any) -> str:
        """Records that it ran (marker file named by its task id)."""
        record(self.request.id, event="ran")
        return "ran"

    @app.task(name="resultproj.hold", shared=False, bind=True, acks_late=True)
    def hold(self: Any, seconds: float) -> None:
        """Records that it started, then sleeps ``seconds`` (acked after it ran)."""
        record(self.request.id, event="started")
        time.sleep(seconds)

    @app.task(
        name="resultproj.finish_then_die", shared=False, bind=True, acks_late=True,
        base=DiesAfterItsResult,
    )
    def finish_then_die(self: Any) -> str:
        record(self.request.id, event="ran")
        return "done"

    @app.task(name="resultproj.wait_turn", shared=False, bind=True, acks_late=True)
    def wait_turn(self: Any) -> int:
        """Run n (1, 2, ...) of a task id waits for the test's go file
        ``go-<task id>-<n>``, then returns n."""
        n = len(runs(self.request.id)) + 1
        record(self.request.id, event="started", run=n)
        wait_for_go(f"{self.request.id}-{n}")
        return n

    @app.task(name="resultproj.kill_worker", shared=False, bind=True, acks_late=True)
    def kill_worker(self: Any) -> None:
        """A poison task: kills the whole worker running it (its process group: the
        main process and every pool process), as an out-of-memory killer would."""
        record(self.request.id, event="ran")
        os.killpg(os.getpgrp(), signal.SIGKILL)

    @app.task(name="resultproj.tsum", shared=False)
    def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(name="resultproj.errback", shared=False)
    def errback(task_id: str) -> None:
        """A ``link_error`` callback: records which task failed."""
        record("errback", failed=task_id)

    @app.task(name="resultproj.effect", shared=False, bind=True, acks_late=True)
    def effect(self: Any, sleep: float = 0) -> str:
        """A task with a side effect the fault suite counts: a ``start`` line when it
        begins and a ``done`` line when it ends, naming the task, the claim it runs
        under (the delivery tag) and the pool process (``pid``)."""
        run = {
            "task": self.request.id,
            "claim": (self.request.properties or {}).get("delivery_tag"),
            "redelivered": bool((self.request.delivery_info or {}).get("redelivered")),
        }
        record(EFFECTS, event="start", **run)
        time.sleep(sleep)
        record(EFFECTS, event="done", **run)
        return str(self.request.id)

    return app


app = make_app(
    os.environ.get(BROKER_ENV, "memory://"),
    json.loads(os.environ.get(OPTIONS_ENV) or "{}"),
    current=True,
)
