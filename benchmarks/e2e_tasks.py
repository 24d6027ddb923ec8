"""Tasks for benchmarks/celery_e2e.py; the broker and backend come from the environment."""

from __future__ import annotations

import json
import os
import time

from celery import Celery

app = Celery("e2e_tasks")
app.conf.update(
    broker_url=os.environ.get("E2E_BROKER", "memory://"),
    result_backend=os.environ.get("E2E_BACKEND") or None,
    broker_transport_options=json.loads(os.environ.get("E2E_TRANSPORT_OPTIONS", "{}")),
    result_backend_transport_options=json.loads(os.environ.get("E2E_TRANSPORT_OPTIONS", "{}")),
    task_ignore_result=not os.environ.get("E2E_BACKEND"),
    worker_prefetch_multiplier=int(os.environ.get("E2E_PREFETCH", "4")),
    broker_connection_retry_on_startup=True,
)
MARKS = os.environ.get("E2E_MARKS", "")


@app.task(name="e2e.noop")
def noop(sent: float = 0.0) -> None:
    """Record when it started (and, for latency runs, how long after it was sent)."""
    if MARKS:
        now = time.time()
        with open(os.path.join(MARKS, f"{os.getpid()}.log"), "a") as out:
            out.write(f"{now} {now - sent if sent else -1}\n")


@app.task(name="e2e.echo")
def echo(x: int) -> int:
    return x
