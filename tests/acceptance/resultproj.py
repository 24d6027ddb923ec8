"""The Celery application of the result-backend acceptance tests (``celery -A resultproj``).

Broker *and* result backend are the event store named in the environment (the
same variables as :mod:`proj`), with ``task_track_started`` and
``result_extended`` on.  The test process builds its own app with
:func:`make_app` and the same task names.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery
from proj import BROKER_ENV, MARKERS_ENV, OPTIONS_ENV, record

#: How long ``resultproj.progress`` waits for the test's go-ahead before failing.
GO_TIMEOUT = 30.0


def go_file(task_id: str) -> str:
    """The marker file the test creates to let ``resultproj.progress`` finish."""
    return f"go-{task_id}"


def make_app(
    broker_url: str, transport_options: dict[str, Any], *, current: bool = False
) -> Celery:
    app = Celery("resultproj", set_as_current=current)
    app.conf.update(
        broker_url=broker_url,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        # The event store when the broker is one; a placeholder in a bare import.
        result_backend=broker_url if broker_url.startswith("eventstore+") else "cache+memory://",
        result_backend_transport_options=transport_options,
        task_track_started=True,
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
        path = os.path.join(os.environ[MARKERS_ENV], go_file(self.request.id))
        deadline = time.monotonic() + GO_TIMEOUT
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise RuntimeError("the test never let the task finish")
            time.sleep(0.05)
        return "done"

    @app.task(name="resultproj.tsum", shared=False)
    def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(name="resultproj.errback", shared=False)
    def errback(task_id: str) -> None:
        """A ``link_error`` callback: records which task failed."""
        record("errback", failed=task_id)

    return app


app = make_app(
    os.environ.get(BROKER_ENV, "memory://"),
    json.loads(os.environ.get(OPTIONS_ENV) or "{}"),
    current=True,
)
