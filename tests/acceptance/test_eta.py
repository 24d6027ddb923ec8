"""ETAs on time: a real worker claims a scheduled task when it is due, woken by
its own timer, not at its next poll (issue #12, item 3) -- on SQLite and on
PostgreSQL, through the event loop (prefork) and the blocking ``drain_events``
path (gevent)."""

from __future__ import annotations

from typing import Any

import pytest
from harness import Broker

#: Far longer than any test here waits: a poll cannot explain a task on time.
LONG_POLL = 60.0
#: Lateness allowed on a loaded CI machine; the benchmark measures the real figure.
ON_TIME = 1.0


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_countdowns_are_claimed_when_due_not_at_the_next_poll(
    broker: Broker, start_worker: Any, pool: str
) -> None:
    broker.options["polling_interval"] = LONG_POLL
    start_worker("-P", pool)
    plain = broker.app.tasks["proj.plain"]
    # Each publish is due sooner than the one before it: every one must bring
    # the worker's wake-up forward, not wait for the one set before.
    countdowns = [4.0, 2.5, 1.5, 0.5]
    ids = [plain.apply_async(countdown=c).id for c in countdowns]

    for task_id in ids:
        broker.wait_for_runs(task_id, ["ran"], timeout=LONG_POLL / 2)
    lateness = {}
    for task_id in ids:
        events = broker.events(task_id)
        not_before = events[0].event.not_before
        claimed = [e for e in events if e.type == "Claimed"]
        assert len(claimed) == 1, [e.type for e in events]
        # One clock for both: the store's (the database's on PostgreSQL).
        lateness[task_id] = claimed[0].recorded_at - not_before
    assert all(0 <= late < ON_TIME for late in lateness.values()), lateness
