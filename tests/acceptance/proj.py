"""The Celery application the acceptance tests run in real workers (``celery -A proj``).

The worker process reads its broker from the environment (see the ``*_ENV`` names
below); the test process builds its own app with :func:`make_app` and the same
task names.  There is no result backend: a task tells the test that it ran by
appending a JSON line to a marker file in the directory named by ``MARKERS_ENV``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery

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


def _seen(name: str) -> bool:
    return os.path.exists(os.path.join(os.environ[MARKERS_ENV], name))


def make_app(
    broker_url: str, transport_options: dict[str, Any], *, current: bool = False
) -> Celery:
    app = Celery("proj", set_as_current=current)
    app.conf.update(
        broker_url=broker_url,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
    )

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
        first = not _seen(self.request.id)
        record(
            self.request.id,
            event="started",
            redelivered=bool(self.request.delivery_info.get("redelivered")),
        )
        if first:
            time.sleep(seconds)
        record(self.request.id, event="done")

    @app.task(name="proj.ordered", shared=False, bind=True)
    def ordered(self: Any, n: int) -> None:
        record(SEQUENCE, n=n, id=self.request.id)

    return app


app = make_app(
    os.environ.get(BROKER_ENV, "memory://"),
    json.loads(os.environ.get(OPTIONS_ENV) or "{}"),
    current=True,
)
