"""A worker meets a corrupt event row: it quarantines that task and keeps working
(issue 10, item 3), on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable

from harness import Broker, Worker, wait_for


def test_a_corrupt_row_costs_one_task_and_the_worker_carries_on(
    broker: Broker, start_worker: Callable[..., Worker]
) -> None:
    plain = broker.app.tasks["proj.plain"]
    ids = [plain.apply_async().id for _ in range(4)]
    ev = broker.store.tables.events
    bad = ids[1]
    with broker.store.engine.begin() as conn:  # an event type this version does not know
        conn.execute(ev.update().where(ev.c.stream_id == bad).values(type="NoSuchEvent"))

    worker = start_worker()
    for task_id in ids[:1] + ids[2:]:
        broker.wait_for_runs(task_id, ["ran"])
    wait_for(
        lambda: [letter.stream for letter in broker.store.dead_letters()] == [bad],
        20, "the corrupt task dead-lettered",
    )
    [letter] = broker.store.dead_letters()
    assert "unreadable event at position" in letter.reason and "NoSuchEvent" in letter.reason
    assert broker.runs(bad) == []

    # The worker is still up and still consuming.
    later = plain.apply_async().id
    broker.wait_for_runs(later, ["ran"])
    assert worker.proc.poll() is None
    assert "quarantined" in worker.log()
