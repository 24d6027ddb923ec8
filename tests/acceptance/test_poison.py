"""Poison tasks with real workers: a task that kills its pool process or its whole
worker is dead-lettered after a bounded number of runs, and the messages around it
are not punished for it -- on both dialects."""

from __future__ import annotations

import signal
import time
import uuid
from typing import Any

import pytest
from harness import Broker, Worker, wait_for

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


def _restart_until(
    broker: Broker, done: Any, args: list[str], timeout: float = 120
) -> list[Worker]:
    """Start a ``resultproj`` worker, and another each time the last one died, until
    ``done()``.  (Not ``start_worker``: a worker may die before it reports ready.)"""
    deadline = time.monotonic() + timeout
    workers: list[Worker] = []
    while not done():
        assert time.monotonic() < deadline, f"not done after {timeout}s: {len(workers)} workers"
        if not workers or workers[-1].proc.poll() is not None:
            worker = Worker(broker, f"w{len(workers) + 1}-{uuid.uuid4().hex[:6]}", args,
                            "resultproj")
            broker.workers.append(worker)  # stopped at teardown
            workers.append(worker)
        time.sleep(0.2)
    return workers


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_innocent_tasks_are_not_dead_lettered_with_a_poison_one(
    broker: Broker, result_app: Any, pool: str
) -> None:
    """A task that kills its whole worker takes the leases of the messages prefetched
    beside it down too, each time.  Those never started, so they do not spend their
    claim budget as the poison task (which recorded a start) does: the poison task is
    dead-lettered after ``max_claims`` runs, and the others each run exactly once."""
    broker.options.update(visibility_timeout=2, max_claims=2)
    poison = result_app.tasks["resultproj.kill_worker"].apply_async().id
    innocents = [result_app.tasks["resultproj.mark"].apply_async().id for _ in range(4)]
    args = ["-P", pool, "-c", "1", "--prefetch-multiplier", "8"]

    workers = _restart_until(broker, lambda: "DeadLettered" in broker.types(poison), args)
    for task_id in innocents:
        broker.wait_for_runs(task_id, ["ran"])
        broker.wait_for_event(task_id, "Acked")

    # Two died with the poison task, the last one lived.
    assert [w.proc.poll() for w in workers] == [-signal.SIGKILL, -signal.SIGKILL, None]
    assert len(broker.runs(poison)) == 2
    events = broker.events(poison)
    assert "2 runs ended" in events[-1].event.reason
    assert [r.event.started for r in events if isinstance(r.event, lc.LeaseExpired)] == [
        True, True,
    ]  # fmt: skip
    for task_id in innocents:
        types = broker.types(task_id)
        assert "DeadLettered" not in types, types
        expired = [r.event for r in broker.events(task_id) if isinstance(r.event, lc.LeaseExpired)]
        assert expired and not any(e.started for e in expired)
        assert result_app.AsyncResult(task_id).get(timeout=10) == "ran"
    assert [d.stream for d in broker.store.dead_letters()] == [poison]


def _kill_after_result(broker: Broker, app: Any, task: str, args: list[str]) -> tuple[str, Any]:
    """Run ``task`` (a :class:`proj.DiesAfterItsResult`) on a worker that it kills
    once it returned: the result is stored, the ack is never written.  Then start
    another worker.  Returns the task id and the second worker."""
    first = Worker(broker, f"w1-{uuid.uuid4().hex[:6]}", args, app)
    broker.workers.append(first)
    first.wait_ready()
    task_id = broker.app.send_task(task).id
    first.proc.wait(30)
    assert first.proc.returncode == -signal.SIGKILL
    second = Worker(broker, f"w2-{uuid.uuid4().hex[:6]}", args, app)
    broker.workers.append(second)
    second.wait_ready()
    return task_id, second


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_a_task_whose_result_is_recorded_is_not_run_again(
    broker: Broker, result_app: Any, pool: str
) -> None:
    """The worker died after the task's result was recorded, before its ack: the
    message is settled when its lease runs out, not run again."""
    broker.options.update(visibility_timeout=2)
    task_id, _ = _kill_after_result(
        broker, "resultproj", "resultproj.finish_then_die", ["-P", pool, "-c", "1"]
    )

    wait_for(
        lambda: "Discarded" in broker.types(task_id),
        20,
        f"the delivery of {task_id} to be settled",
        show=lambda: broker.types(task_id),
    )
    events = broker.events(task_id)
    assert _outcomes([r.type for r in events]) == [
        "Published", "Claimed", "Started", "Succeeded", "LeaseExpired", "Discarded",
    ]  # fmt: skip
    assert events[-1].event.reason == "outcome recorded"
    assert len(broker.runs(task_id)) == 1
    assert result_app.AsyncResult(task_id).get(timeout=10) == "done"
    assert broker.store.queue_size("celery") == 0
    assert broker.store.dead_letters() == []


def test_without_the_event_store_backend_the_task_runs_again(broker: Broker) -> None:
    """With another result backend (here none) the stream holds no result: the
    message is delivered again after its lease, as before."""
    broker.options.update(visibility_timeout=2)
    task_id, _ = _kill_after_result(
        broker, "proj", "proj.finish_then_die", ["-P", "solo", "-c", "1"]
    )

    broker.wait_for_runs(task_id, ["ran", "ran"])
    broker.wait_for_event(task_id, "Acked")
    assert _outcomes(broker.types(task_id)) == [
        "Published", "Claimed", "LeaseExpired", "Claimed", "Acked",
    ]  # fmt: skip
