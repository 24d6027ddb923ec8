"""The worker's other execution pools -- solo, threads, eventlet, gevent -- on both
dialects (issue #3: "eventlet/gevent must at least not break").

solo runs tasks on the event loop (leases are renewed by the transport's thread);
threads acks and stores results from pool threads; eventlet and gevent patch the
standard library, and their workers use the blocking ``drain_events`` path instead
of the event loop.  Each worker runs a few tasks, a failure, a retry with a
countdown and a countdown task, and the test process waits on their results.
"""

from __future__ import annotations

from typing import Any

import pytest
from harness import Broker

from celery_eventstore import lifecycle as lc

TIMEOUT = 30.0


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["solo", "threads", "eventlet", "gevent"])
def test_pool_runs_tasks_results_and_countdowns(
    broker: Broker, result_app: Any, start_worker: Any, pool: str
) -> None:
    worker = start_worker("-P", pool, app="resultproj")
    banner = "thread" if pool == "threads" else pool
    assert f"({banner})" in worker.log(), "the worker's banner names another pool"
    add = result_app.tasks["resultproj.add"]

    later = add.apply_async((20, 22), countdown=2)
    sums = [add.delay(i, i) for i in range(5)]
    failing = result_app.tasks["resultproj.boom"].delay(3)
    retried = result_app.tasks["resultproj.retrying"].delay(1)

    assert [r.get(timeout=TIMEOUT) for r in sums] == [0, 2, 4, 6, 8]
    error = failing.get(timeout=TIMEOUT, propagate=False)
    assert isinstance(error, ValueError) and str(error) == "boom 3"
    assert retried.get(timeout=TIMEOUT) == 1
    assert later.get(timeout=TIMEOUT) == 42

    # The countdown was held in the store: no claim before it was due.
    events = broker.events(later.id)
    published = next(r.event for r in events if isinstance(r.event, lc.Published))
    claimed = next(r for r in events if isinstance(r.event, lc.Claimed))
    assert published.not_before is not None
    assert claimed.recorded_at >= published.not_before
    # Every delivery was acked once, with no lease running out on the way.
    for task in [later, *sums, failing, retried]:
        types = broker.wait_for_event(task.id, "Acked")
        assert "LeaseExpired" not in types and "DeadLettered" not in types, types
    assert broker.types(retried.id).count("Acked") == 2
    assert worker.proc.poll() is None
