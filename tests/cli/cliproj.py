"""The Celery application whose worker produces the CLI tests' data (``celery -A cliproj``).

Broker and result backend are the event store named in the environment (the same
variables as the acceptance ``proj``), so every command has results to show as well
as deliveries.  The ``celery -A cliproj eventstore ...`` sub-command reads the same.
"""

from __future__ import annotations

import json
import os
from typing import Any

from celery import Celery
from celery.exceptions import Reject
from proj import BROKER_ENV, OPTIONS_ENV, base_app, record, seen, wait_for_go

#: A queue no worker of the tests consumes: its messages stay ready.
IDLE_QUEUE = "reports"
#: A second queue the workers consume (``dead purge --queue``).
POISON_QUEUE = "poison"

def make_app(
    broker_url: str, transport_options: dict[str, Any], *, current: bool = False
) -> Celery:
    app = base_app("cliproj", broker_url, transport_options, current=current, results=True)

    @app.task(name="cliproj.add", shared=False, bind=True)
    def add(self: Any, x: int, y: int = 0) -> int:
        record(self.request.id, event="ran")
        return x + y

    @app.task(name="cliproj.flaky", shared=False, bind=True)
    def flaky(self: Any, failures: int) -> str:
        """Fails ``failures`` times (retrying each time), then succeeds."""
        if self.request.retries < failures:
            exc = ConnectionError(f"flaky attempt {self.request.retries + 1} failed")
            raise self.retry(exc=exc, countdown=0.5, max_retries=failures)
        return f"ok after {self.request.retries} retries"

    @app.task(name="cliproj.fail", shared=False)
    def fail(reason: str) -> None:
        raise ValueError(reason)

    @app.task(name="cliproj.tsum", shared=False)
    def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(name="cliproj.hold", shared=False, bind=True, acks_late=True)
    def hold(self: Any) -> str:
        """Runs (holding its message's lease) until the test creates its go-ahead file."""
        wait_for_go(self.request.id)
        return "released"

    @app.task(name="cliproj.poison", shared=False, bind=True, acks_late=True)
    def poison(self: Any) -> str:
        """Rejected (dead-lettered) on its first run; later runs succeed."""
        first = not seen(self.request.id)
        record(self.request.id, event="ran")
        if first:
            raise Reject("poison message", requeue=False)
        return "cured"

    return app


app = make_app(
    os.environ.get(BROKER_ENV, "memory://"),
    json.loads(os.environ.get(OPTIONS_ENV) or "{}"),
    current=True,
)
