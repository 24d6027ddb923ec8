"""``celery events``: a worker started with ``-E`` sends task events and heartbeats
that reach an event receiver in another process, and that monitoring traffic stays
out of the task history and does not pile up once nobody listens (issue #3, item 3).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import proj
import pytest
from harness import Broker, wait_for

from celery_eventstore.transport import ROUTING_CACHE_SECONDS

#: The receiver's queue: messages live 2 s, the queue goes after 4 s unused (Celery's
#: defaults are 5 s and 60 s; shorter ones keep the test short).
EVENT_QUEUE_TTL = 2.0
EVENT_QUEUE_EXPIRES = 4.0
#: The worker's keeper sweeps every SWEEP_INTERVAL (10 s): the queue is gone by then.
GONE_TIMEOUT = 40.0
TIMEOUT = 30.0


class Monitor(threading.Thread):
    """What ``celery events`` does: an event receiver, here collecting every event."""

    def __init__(self, app: Any) -> None:
        super().__init__(name="event-monitor", daemon=True)
        self.events: list[dict[str, Any]] = []
        self.connection = app.connection_for_read()
        self.receiver = app.events.Receiver(self.connection, handlers={"*": self.events.append})
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.receiver.capture(limit=None, timeout=None, wakeup=False)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def stop(self) -> None:
        self.receiver.should_stop = True
        self.join(TIMEOUT)
        self.connection.close()

    def of(self, kind: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            e for e in list(self.events)
            if e.get("type") == kind and all(e.get(k) == v for k, v in fields.items())
        ]  # fmt: skip


@pytest.fixture
def monitor_app(broker: Broker) -> Iterator[Any]:
    app = proj.make_app(broker.url, broker.transport_options())
    app.conf.update(event_queue_ttl=EVENT_QUEUE_TTL, event_queue_expires=EVENT_QUEUE_EXPIRES)
    yield app
    app.pool.force_close_all()
    app.close()


@pytest.mark.slow
def test_task_events_and_heartbeats_reach_a_receiver_and_leave_no_trace(
    broker: Broker, start_worker: Any, monitor_app: Any
) -> None:
    worker = start_worker("-E", "--heartbeat-interval", "1")
    monitor = Monitor(monitor_app)
    monitor.start()
    queue = monitor.receiver.queue.name
    wait_for(lambda: broker.store.queue_exists(queue) or monitor.error, TIMEOUT,
             "the receiver's queue to be declared")  # fmt: skip

    task_ids = [broker.app.tasks["proj.plain"].apply_async().id for _ in range(3)]

    def seen() -> bool:
        if monitor.error is not None:
            raise monitor.error
        done = all(
            monitor.of(kind, uuid=t)
            for t in task_ids
            for kind in ("task-received", "task-started", "task-succeeded")
        )
        return done and len(monitor.of("worker-heartbeat")) >= 2

    wait_for(seen, TIMEOUT, "task events and two heartbeats",
             show=lambda: sorted({e.get("type") for e in monitor.events}))  # fmt: skip
    monitor.stop()
    assert monitor.error is None, repr(monitor.error)
    hostname = monitor.of("worker-heartbeat")[-1]["hostname"]
    assert hostname.startswith(f"{worker.name}@")
    assert {e["hostname"] for e in monitor.of("task-succeeded")} == {hostname}

    # Nobody reads the receiver's queue now, while the worker keeps sending
    # heartbeats to it: its messages expire, and the queue itself, idle past its
    # x-expires, is swept with its bindings and rows.
    assert broker.store.queue_info([queue])[queue].transient
    wait_for(lambda: not broker.store.queue_exists(queue), GONE_TIMEOUT,
             f"the idle event queue {queue} to be swept",
             show=broker.store.queue_stats)  # fmt: skip
    assert broker.store.transient_size(queue) == 0
    assert all(b.queue != queue for b in broker.store.bindings("celeryev"))
    # Heartbeats routed by a binding cached from before the sweep are dropped, not
    # stored as durable messages: the only streams in the log are the tasks'.
    time.sleep(2 * ROUTING_CACHE_SECONDS)  # not an assertion: let such stragglers land
    assert not broker.store.queue_exists(queue)
    streams = {r.stream for r in _all_events(broker)}
    assert streams == set(task_ids), sorted(streams - set(task_ids))
    assert worker.proc.poll() is None


def _all_events(broker: Broker) -> list[Any]:
    out: list[Any] = []
    after = 0
    while page := broker.store.read_all(after=after, limit=1000):
        out.extend(page)
        after = page[-1].position
    return out

