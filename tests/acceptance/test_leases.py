"""Leases with real workers: crash (kill -9) and redelivery, renewal of a long
task's lease, and dead-lettering after the claim budget -- on both dialects."""

from __future__ import annotations

from typing import Any

from harness import Broker, wait_for

from celery_eventstore import lifecycle as lc


def _outcomes(types: list[str]) -> list[str]:
    """Event types with the lease renewals left out."""
    return [t for t in types if t != "LeaseRenewed"]


def _start_and_kill(broker: Broker, start_worker: Any, seconds: float) -> tuple[str, Any]:
    """Start a worker, run ``proj.hold`` on it, and kill -9 the worker mid-task."""
    first = start_worker()
    task_id = broker.app.tasks["proj.hold"].apply_async(args=(seconds,)).id
    broker.wait_for_runs(task_id, ["started"])
    assert _outcomes(broker.types(task_id)) == ["Published", "Claimed"]
    first.kill()
    return task_id, first


def test_acks_late_task_is_redelivered_after_kill_9(broker: Broker, start_worker: Any) -> None:
    broker.options["visibility_timeout"] = 3
    task_id, first = _start_and_kill(broker, start_worker, 30)

    second = start_worker()

    broker.wait_for_runs(task_id, ["started", "started", "done"], timeout=30)
    broker.wait_for_event(task_id, "Acked")
    events = broker.events(task_id)
    assert _outcomes([r.type for r in events]) == [
        "Published", "Claimed", "LeaseExpired", "Claimed", "Acked",
    ]  # fmt: skip
    claims = [r for r in events if isinstance(r.event, lc.Claimed)]
    assert f":{first.proc.pid}:" in claims[0].event.consumer
    assert f":{second.proc.pid}:" in claims[1].event.consumer
    # Not re-claimed before the dead worker's last lease ran out.
    leases = [
        r.event.lease_until
        for r in events[: events.index(claims[1])]
        if isinstance(r.event, (lc.Claimed, lc.LeaseRenewed))
    ]
    assert claims[1].recorded_at >= max(leases)
    assert [r["redelivered"] for r in broker.runs(task_id) if r["event"] == "started"] == [
        False, True,
    ]  # fmt: skip
    assert second.received(task_id)


def test_running_task_keeps_its_lease(broker: Broker, start_worker: Any) -> None:
    broker.options["visibility_timeout"] = 2
    start_worker()
    task_id = broker.app.tasks["proj.hold"].apply_async(args=(8,)).id

    broker.wait_for_runs(task_id, ["started", "done"], timeout=30)
    broker.wait_for_event(task_id, "Acked")
    events = broker.events(task_id)
    types = [r.type for r in events]
    assert types.count("Claimed") == 1, types
    assert "LeaseExpired" not in types
    assert types.count("LeaseRenewed") >= 2, types
    assert types[-1] == "Acked"
    # Each renewal (and the ack) came while the previous lease still held.
    lease_until = None
    for r in events:
        if lease_until is not None:
            assert r.recorded_at <= lease_until, f"{r.type} after the lease ran out"
        if isinstance(r.event, (lc.Claimed, lc.LeaseRenewed)):
            lease_until = r.event.lease_until
    assert [r["event"] for r in broker.runs(task_id)] == ["started", "done"]


def test_crash_loop_is_dead_lettered(broker: Broker, start_worker: Any, result_app: Any) -> None:
    """A task the store saw start (``task_track_started``) whose worker died is a
    lost run: ``max_claims`` of those and it is dead-lettered."""
    broker.options.update(visibility_timeout=3, max_claims=1)
    first = start_worker(app="resultproj")
    task_id = result_app.tasks["resultproj.hold"].apply_async(args=(30,)).id
    broker.wait_for_runs(task_id, ["started"])
    broker.wait_for_event(task_id, "Started")
    first.kill()

    second = start_worker(app="resultproj")

    wait_for(
        lambda: broker.types(task_id)[-1] == "DeadLettered",
        20,
        f"task {task_id} to be dead-lettered",
        show=lambda: broker.types(task_id),
    )
    events = broker.events(task_id)
    assert _outcomes([r.type for r in events]) == [
        "Published", "Claimed", "Started", "LeaseExpired", "DeadLettered",
    ]  # fmt: skip
    assert events[-2].event == lc.LeaseExpired(events[1].event.delivery, events[1].event.claim,
                                               started=True)
    assert "lease" in events[-1].event.reason
    assert [r["event"] for r in broker.runs(task_id)] == ["started"]
    assert not second.received(task_id)
    stats = broker.stats()
    assert stats is not None
    assert (stats.dead, stats.claimed, stats.ready, stats.scheduled) == (1, 0, 0, 0)


def test_a_lease_lost_before_any_start_is_not_a_lost_run(
    broker: Broker, start_worker: Any
) -> None:
    """Without ``task_track_started`` the store cannot tell a task that was running
    from one only prefetched: a lost lease then spends the larger budget (three
    times ``max_claims``), and the task runs again."""
    broker.options.update(visibility_timeout=3, max_claims=1)
    task_id, _ = _start_and_kill(broker, start_worker, 30)

    start_worker()

    broker.wait_for_runs(task_id, ["started", "started", "done"], timeout=30)
    broker.wait_for_event(task_id, "Acked")
    expired = [r.event for r in broker.events(task_id) if isinstance(r.event, lc.LeaseExpired)]
    assert [e.started for e in expired] == [False]
