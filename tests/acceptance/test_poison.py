"""Poison tasks with real workers: a task that kills its pool process or its whole
worker is dead-lettered after a bounded number of runs, and the messages around it
are not punished for it -- on both dialects."""

from __future__ import annotations

from typing import Any

from harness import Broker, wait_for

from celery_eventstore import lifecycle as lc


def _outcomes(types: list[str]) -> list[str]:
    """Event types with the lease renewals left out."""
    return [t for t in types if t != "LeaseRenewed"]


def _wait_dead(broker: Broker, task_id: str, timeout: float = 60) -> None:
    wait_for(
        lambda: "DeadLettered" in broker.types(task_id),
        timeout,
        f"task {task_id} to be dead-lettered",
        show=lambda: {"runs": len(broker.runs(task_id)), "stream": broker.types(task_id)},
    )


def test_requeues_on_worker_lost_count_towards_max_claims(
    broker: Broker, start_worker: Any
) -> None:
    """With ``task_reject_on_worker_lost`` Celery requeues the message of a task
    whose pool process died: each such requeue is a lost run, so the task stops
    after ``max_claims`` runs instead of looping."""
    broker.options.update(max_claims=2)
    worker = start_worker("-c", "1")
    task_id = broker.app.tasks["proj.kill_pool_process"].apply_async().id

    _wait_dead(broker, task_id)

    events = broker.events(task_id)
    assert _outcomes([r.type for r in events]) == [
        "Published", "Claimed", "Requeued", "Claimed", "Requeued", "DeadLettered",
    ]  # fmt: skip
    assert all(r.event.lost for r in events if isinstance(r.event, lc.Requeued))
    assert "2 runs" in events[-1].event.reason
    assert len(broker.runs(task_id)) == 2
    assert worker.proc.poll() is None  # only the pool processes died
    stats = broker.stats()
    assert stats is not None
    assert (stats.dead, stats.claimed, stats.ready) == (1, 0, 0)
