"""A real prefork worker on the event-store broker: delivery, retries, ETA,
priorities, expiry, and inspect/control -- on SQLite and on PostgreSQL."""

from __future__ import annotations

import time
from typing import Any

import proj
from harness import Broker, Worker, wait_for

from celery_eventstore import lifecycle as lc

#: How long a control client collects replies (Celery's default is 1 s; a busy
#: CI machine gets some slack).
CONTROL_TIMEOUT = 2.0


def _published(events: list[Any]) -> list[Any]:
    return [r for r in events if isinstance(r.event, lc.Published)]


def _claims_of(events: list[Any], delivery: str) -> list[Any]:
    return [r for r in events if isinstance(r.event, lc.Claimed) and r.event.delivery == delivery]


def test_plain_task_runs_once(broker: Broker, worker: Worker) -> None:
    task_id = broker.app.tasks["proj.plain"].apply_async().id

    broker.wait_for_runs(task_id, ["ran"])
    broker.wait_for_event(task_id, "Acked")

    events = broker.events(task_id)
    assert [r.type for r in events] == ["Published", "Claimed", "Acked"]
    published, claimed, acked = (r.event for r in events)
    assert events[0].metadata["task"] == "proj.plain"
    assert published.queue == "celery"
    assert claimed.delivery == acked.delivery == published.delivery
    assert claimed.claim == acked.claim
    # The worker's main process claimed it (its consumer id names its pid).
    assert f":{worker.proc.pid}:" in claimed.consumer
    runs = broker.runs(task_id)
    assert len(runs) == 1
    assert runs[0]["redelivered"] is False


def test_retry_with_countdown_is_scheduled_in_the_store(broker: Broker, worker: Worker) -> None:
    task_id = broker.app.tasks["proj.retrying"].apply_async(args=(2,)).id

    wait_for(
        lambda: broker.types(task_id).count("Acked") == 3 and len(broker.runs(task_id)) == 3,
        30,
        f"three acked deliveries of {task_id}",
        show=lambda: {"runs": broker.runs(task_id), "stream": broker.types(task_id)},
    )

    events = broker.events(task_id)
    published = _published(events)
    assert len(published) == 3, [r.type for r in events]
    assert len({p.event.delivery for p in published}) == 3
    assert published[0].event.not_before is None
    assert [p.metadata.get("retries") for p in published] == [0, 1, 2]
    for p in published[1:]:
        not_before = p.event.not_before
        assert not_before is not None, "a retry(countdown=1) re-publish has no not_before"
        assert not_before >= p.recorded_at + 0.5
        claims = _claims_of(events, p.event.delivery)
        assert len(claims) == 1
        assert claims[0].recorded_at >= not_before, (
            f"delivery {p.event.delivery} claimed at {claims[0].recorded_at}, "
            f"before its not_before {not_before}"
        )
    assert [r["retries"] for r in broker.runs(task_id)] == [0, 1, 2]


def test_eta_is_held_in_the_store(broker: Broker, worker: Worker) -> None:
    # The ETA is the caller's clock plus the countdown: bound it by the database's
    # clock around the call (a loaded machine may record the publish much later).
    called = broker.store.now()
    task_id = broker.app.tasks["proj.plain"].apply_async(countdown=3).id
    returned = broker.store.now()
    published = broker.events(task_id)[0]
    not_before = published.event.not_before
    assert not_before is not None
    assert called + 3 - 0.5 <= not_before <= returned + 3 + 0.5

    time.sleep(max(0.0, published.recorded_at + 1.5 - broker.store.now()))

    assert not worker.received(task_id), "the worker received an ETA task before it was due"
    stats = broker.stats()
    assert stats is not None
    assert (stats.scheduled, stats.claimed, stats.ready) == (1, 0, 0)
    assert broker.types(task_id) == ["Published"]

    broker.wait_for_runs(task_id, ["ran"])
    runs = broker.runs(task_id)
    assert runs[0]["time"] >= not_before - 0.05
    broker.wait_for_event(task_id, "Acked")
    events = broker.events(task_id)
    assert [r.type for r in events] == ["Published", "Claimed", "Acked"]
    assert events[1].recorded_at >= not_before
    assert worker.received(task_id)


def test_priorities_are_served_lowest_number_first(broker: Broker, start_worker: Any) -> None:
    priorities = [9, 0, 5, 3, 7, 1]
    ordered = broker.app.tasks["proj.ordered"]
    for p in priorities:
        ordered.apply_async(args=(p,), priority=p)
    assert broker.stats().ready == len(priorities)

    start_worker("-c", "1", "--prefetch-multiplier", "1")

    runs = wait_for(
        lambda: len(r := broker.runs(proj.SEQUENCE)) >= len(priorities) and r,
        30,
        "every prioritized task to run",
        show=lambda: (broker.runs(proj.SEQUENCE), broker.stats()),
    )
    assert [r["n"] for r in runs] == sorted(priorities)


def test_expired_task_is_discarded_not_run(broker: Broker, start_worker: Any) -> None:
    task_id = broker.app.tasks["proj.plain"].apply_async(expires=1).id
    published = broker.events(task_id)[0].event
    assert published.expires is not None
    # The worker needs a second or two to start: it cannot claim before then.
    time.sleep(max(0.0, published.expires + 0.2 - broker.store.now()))

    worker = start_worker()

    wait_for(
        lambda: broker.types(task_id)[-1] != "Published",
        20,
        f"the expired task {task_id} to be settled",
        show=lambda: broker.types(task_id),
    )
    events = broker.events(task_id)
    assert [r.type for r in events] == ["Published", "Discarded"]
    assert events[-1].event.reason == "expired"
    assert broker.runs(task_id) == []
    assert not worker.received(task_id)


def test_inspect_and_control_across_processes(broker: Broker, worker: Worker) -> None:
    app = broker.app
    plain = app.tasks["proj.plain"]

    replies = app.control.inspect(timeout=CONTROL_TIMEOUT).ping()
    assert replies, "no worker answered ping"
    (hostname,) = [h for h in replies if h.startswith(f"{worker.name}@")]
    assert replies[hostname] == {"ok": "pong"}

    answers = app.control.broadcast("ping", reply=True, timeout=CONTROL_TIMEOUT)
    assert {"ok": "pong"} in [a.get(hostname) for a in answers]

    running = plain.apply_async(kwargs={"sleep": 3}).id
    broker.wait_for_runs(running, ["ran"])
    active = app.control.inspect(timeout=CONTROL_TIMEOUT).active()
    assert active and running in [t["id"] for t in active[hostname]]

    # A broadcast revoke reaches the worker (Celery's in-memory revoke) and the
    # store (durable): the scheduled task is discarded there and never delivered.
    sent = time.time()
    revoked = plain.apply_async(countdown=3).id
    answers = app.control.revoke(revoked, reply=True, timeout=CONTROL_TIMEOUT)
    assert any(hostname in a for a in answers), answers
    assert broker.types(revoked) == ["Published", "Revoked", "Discarded"]
    assert broker.events(revoked)[1].event.reason == "revoked by a control broadcast"

    broker.wait_for_event(running, "Acked")
    time.sleep(max(0.0, 3.5 - (time.time() - sent)))  # past the revoked task's due time
    assert broker.runs(revoked) == []
    assert broker.types(revoked) == ["Published", "Revoked", "Discarded"]

    # Pidbox requests and replies are transient: only the two tasks are in the log.
    events, position = [], 0
    while batch := broker.store.read_all(after=position):
        events += batch
        position = batch[-1].position
    streams = {r.stream for r in events}
    assert streams <= {running, revoked}, sorted(streams - {running, revoked})
    assert streams == {running, revoked}


def test_revoke_without_reply_reaches_the_worker(broker: Broker, worker: Worker) -> None:
    # AsyncResult.revoke() waits for no reply, and kombu then sends the broadcast with
    # an ``expires`` header of 0, meaning "never": it must not count as long expired.
    app = broker.app
    result = app.tasks["proj.plain"].apply_async(countdown=60)
    result.revoke()

    def revoked() -> list[str]:
        replies = app.control.inspect(timeout=CONTROL_TIMEOUT).revoked() or {}
        return [i for host, ids in replies.items() if host.startswith(f"{worker.name}@")
                for i in ids]

    assert result.id in wait_for(revoked, 10, "the worker to list the revoked task")


def test_back_to_back_control_requests_get_replies(broker: Broker, worker: Worker) -> None:
    app = broker.app
    # Every request has a reply queue of its own; limit=1 returns on the first reply.
    replies = [app.control.inspect(timeout=3, limit=1).ping() for _ in range(3)]
    answered = [bool(r) and any(h.startswith(f"{worker.name}@") for h in r) for r in replies]
    assert answered == [True, True, True], f"replies to three pings in a row: {replies}"
