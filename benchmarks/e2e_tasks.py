"""Tasks for the Celery benchmarks; the broker and backend come from the environment.

``E2E_MARKS`` (a directory): ``noop`` appends ``<start> <start - sent>`` to a file
per process (``eta.py``, ``scaling.py``).  ``E2E_TRACE`` (a directory): every task
appends ``<name> <start> <end> <sent>`` to a file per process, the end taken after
Celery stored its result (``task_postrun``), and the worker writes
``ready-<pid>`` there once it consumes (``celery_e2e.py``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery, signals

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
if os.environ.get("E2E_QUEUE"):
    app.conf.task_default_queue = os.environ["E2E_QUEUE"]
MARKS = os.environ.get("E2E_MARKS", "")
TRACE = os.environ.get("E2E_TRACE", "")


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


@app.task(name="e2e.fire", ignore_result=True)
def fire(sent: float = 0.0) -> None:
    """A no-op whose result nobody wants: nothing is stored for it."""


if TRACE:
    _started: dict[str, float] = {}
    _trace_file: list[Any] = []

    @signals.task_prerun.connect
    def _trace_start(task_id: str = "", **_: Any) -> None:
        _started[task_id] = time.time()

    @signals.task_postrun.connect
    def _trace_end(task_id: str = "", task: Any = None, kwargs: Any = None, **_: Any) -> None:
        end = time.time()
        if not _trace_file:  # opened in the pool process, line-buffered
            _trace_file.append(open(os.path.join(TRACE, f"{os.getpid()}.trace"), "a", 1))
        sent = (kwargs or {}).get("sent", 0.0)
        _trace_file[0].write(f"{task.name} {_started.pop(task_id, end)} {end} {sent}\n")

    @signals.worker_ready.connect
    def _ready(**_: Any) -> None:
        open(os.path.join(TRACE, f"ready-{os.getpid()}"), "w").close()
