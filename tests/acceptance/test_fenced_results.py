"""Results come with the claim of the message they ran: a real worker's results
name their delivery, on the prefork and the solo pool, and a result from a worker
whose lease another worker took over is fenced out -- on both dialects."""

from __future__ import annotations

import os
import signal
import uuid
from typing import Any

import proj
import pytest
from celery.app.task import Context
from celery.result import GroupResult
from harness import Broker, wait_for

from celery_eventstore import lifecycle as lc
from celery_eventstore.backend import CLAIM_HEADER


def _go(broker: Broker, task_id: str, run: int) -> None:
    (broker.markers / proj.go_file(f"{task_id}-{run}")).touch()


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_results_name_the_delivery_they_ran(
    broker: Broker, start_worker: Any, result_app: Any, pool: str
) -> None:
    """The transport's claim header reaches the backend through Celery's request,
    in the pool process and in the solo worker, and for early and late acks."""
    start_worker("-P", pool, "-c", "1", app="resultproj")
    ok = result_app.tasks["resultproj.add"].delay(2, 3)
    failed = result_app.tasks["resultproj.boom"].delay(1)
    late = result_app.tasks["resultproj.wait_turn"].delay()
    _go(broker, late.id, 1)
    assert ok.get(timeout=30) == 5
    assert isinstance(failed.get(propagate=False, timeout=30), ValueError)
    assert late.get(timeout=30) == 1

    for task_id, outcome in ((ok.id, lc.Succeeded), (failed.id, lc.Failed),
                             (late.id, lc.Succeeded)):
        events = [r.event for r in broker.events(task_id)]
        published = next(e for e in events if isinstance(e, lc.Published))
        results = [e for e in events if isinstance(e, (lc.Started, outcome))]
        assert [type(e) for e in results] == [lc.Started, outcome], events
        assert {e.delivery for e in results} == {published.delivery}


def test_a_result_from_a_worker_whose_lease_was_taken_over_is_fenced_out(
    broker: Broker, start_worker: Any, result_app: Any
) -> None:
    """The first worker stops (SIGSTOP: its lease is not renewed) while its pool
    process runs the task; a second worker claims the message and runs it too.
    The first run finishes first: its result is kept as ``ResultFenced``, and the
    task's outcome is the second run's."""
    broker.options.update(visibility_timeout=3)
    first = start_worker("-c", "1", app="resultproj")
    task_id = result_app.tasks["resultproj.wait_turn"].delay().id
    broker.wait_for_runs(task_id, ["started"])
    broker.wait_for_event(task_id, "Started")
    os.kill(first.proc.pid, signal.SIGSTOP)  # the main process: its pool process runs on
    try:
        start_worker("-c", "1", app="resultproj")
        broker.wait_for_runs(task_id, ["started", "started"], timeout=30)

        _go(broker, task_id, 1)  # the first run, fenced out, finishes first
        broker.wait_for_event(task_id, "ResultFenced")
        assert result_app.AsyncResult(task_id).state == "STARTED"
        _go(broker, task_id, 2)
        assert result_app.AsyncResult(task_id).get(timeout=30) == 2
    finally:
        os.kill(first.proc.pid, signal.SIGCONT)

    events = [r.event for r in broker.events(task_id)]
    claims = [e for e in events if isinstance(e, lc.Claimed)]
    assert len(claims) == 2
    fenced = [e for e in events if isinstance(e, lc.ResultFenced)]
    assert fenced == [lc.ResultFenced(claims[0].delivery, claims[0].claim, "SUCCESS")]
    succeeded = [e for e in events if isinstance(e, lc.Succeeded)]
    assert len(succeeded) == 1 and succeeded[0].delivery == claims[1].delivery
    # The first worker's late ack is fenced out too; the second's stands.
    wait_for(lambda: "Acked" in broker.types(task_id), 20, f"the ack of {task_id}")
    acked = [e for e in (r.event for r in broker.events(task_id)) if isinstance(e, lc.Acked)]
    assert [a.claim for a in acked] == [claims[1].claim]


def test_a_fenced_out_run_does_not_count_towards_its_chord(
    broker: Broker, result_app: Any
) -> None:
    """Celery counts a chord's header task right after storing its result: the
    run whose claim was taken over does not, the run that took it over does."""
    r = result_app.tasks["resultproj.add"].apply_async(args=(1,))  # no worker: claimed here
    [first] = broker.store.claim(["celery"], 1, "w1", 0)  # its lease runs out at once
    [second] = broker.store.claim(["celery"], 1, "w2", 30)
    assert (first.delivery, second.redelivered) == (second.delivery, True)
    gid = str(uuid.uuid4())
    GroupResult(gid, [result_app.AsyncResult(r.id)]).save(backend=result_app.backend)
    callback = dict(result_app.tasks["resultproj.tsum"].s())

    def finish(claim: str) -> None:
        request = Context({"id": r.id, "group": gid, "chord": callback, CLAIM_HEADER: claim})
        result_app.backend.mark_as_done(r.id, 1, request=request)

    finish(first.claim)
    assert broker.types(r.id)[-1] == "ResultFenced"
    assert broker.types(lc.chord_stream(gid)) == []
    finish(second.claim)
    assert broker.types(lc.chord_stream(gid)) == ["ChordPartDone", "ChordCompleted"]
    assert result_app.AsyncResult(r.id).get(timeout=10) == 1
