"""The fault suite's counter tells explained re-runs from unexplained ones: a suite
whose zeros could not fail would prove nothing.  No database, no workers."""

from __future__ import annotations

import json
from typing import Any

from tally import Faults, Run, Window, tally

from celery_eventstore import lifecycle as lc
from celery_eventstore.storage import RecordedEvent

KILLED, HEALTHY = 111, 222


def _log(task: str, *events: tuple[float, Any]) -> list[RecordedEvent]:
    return [
        RecordedEvent(position=i, stream=task, version=i, event=e, metadata=None, recorded_at=t)
        for i, (t, e) in enumerate(events, 1)
    ]


def _claimed(claim: str, pid: int, lease_until: float) -> lc.Claimed:
    return lc.Claimed(delivery="d", claim=claim, consumer=f"host:{pid}:x", lease_until=lease_until)


def _runs(task: str, *claims: tuple[str | None, float]) -> list[Run]:
    """Runs under ``claims`` (claim, start time); all but the last cut short."""
    runs = [Run(task, claim, 1000 + i, started) for i, (claim, started) in enumerate(claims)]
    runs[-1].done = True
    return runs


def _count(runs: list[Run], log: list[RecordedEvent], faults: Faults) -> Any:
    return tally({"t": runs}, {"t": log}, ["t"], [], faults)


def test_a_rerun_after_a_kill_of_the_claim_holder_is_explained():
    log = _log("t", (0, lc.Published("d", "q", {})), (10, _claimed("c1", KILLED, 14)),
               (13, lc.LeaseRenewed("d", "c1", 18)), (18, lc.LeaseExpired("d", "c1")),
               (18, _claimed("c2", HEALTHY, 22)), (19, lc.Succeeded()),
               (19, lc.Acked("d", "c2")))  # fmt: skip
    counts = _count(_runs("t", ("c1", 11), ("c2", 18.5)), log, Faults(kills={KILLED: 16}))
    assert (counts.lost, counts.explained, counts.unexplained) == ([], 1, [])
    assert counts.after_result == 0


def test_a_rerun_is_unexplained_when_no_killed_worker_held_the_claim():
    log = _log("t", (10, _claimed("c1", HEALTHY, 14)), (18, _claimed("c2", HEALTHY, 22)))
    runs = _runs("t", ("c1", 11), ("c2", 18.5))
    # Killed, but after the lease had run out: a healthy worker's lease was taken.
    assert len(_count(runs, log, Faults(kills={HEALTHY: 15})).unexplained) == 1
    assert len(_count(runs, log, Faults(kills={KILLED: 12})).unexplained) == 1
    assert _count(runs, log, Faults(kills={HEALTHY: 12})).explained == 1


def test_two_runs_under_one_claim_are_unexplained():
    log = _log("t", (10, _claimed("c1", KILLED, 14)))
    counts = _count(_runs("t", ("c1", 11), ("c1", 12)), log, Faults(kills={KILLED: 13}))
    assert len(counts.unexplained) == 1


def test_a_window_explains_the_claims_it_caught():
    log = _log("t", (10, _claimed("c1", HEALTHY, 14)), (20, _claimed("c2", HEALTHY, 24)))
    runs = _runs("t", ("c1", 11), ("c2", 21))
    assert _count(runs, log, Faults(windows=[Window(12, 13)])).explained == 1
    assert len(_count(runs, log, Faults(windows=[Window(15, 16)])).unexplained) == 1


def test_only_a_crash_explains_a_claim_missing_from_the_log():
    log = _log("t", (20, _claimed("c2", HEALTHY, 24)))
    runs = _runs("t", ("lost", 11), ("c2", 21))
    assert _count(runs, log, Faults(windows=[Window(12, 13, crash=True)])).explained == 1
    assert len(_count(runs, log, Faults(windows=[Window(12, 13)])).unexplained) == 1


def test_a_rerun_after_a_recorded_result_is_counted_apart():
    log = _log("t", (10, _claimed("c1", KILLED, 14)), (11, lc.Succeeded()),
               (18, _claimed("c2", HEALTHY, 22)))  # fmt: skip
    counts = _count(_runs("t", ("c1", 10.5), ("c2", 18.5)), log, Faults(kills={KILLED: 12}))
    assert (counts.explained, counts.after_result) == (1, 1)


def test_a_message_settled_after_its_result_is_not_lost():
    """The worker died between the result and the ack: the message is settled."""
    log = _log("t", (10, _claimed("c1", KILLED, 14)), (11, lc.Succeeded()),
               (18, lc.LeaseExpired("d", "c1")), (18, lc.Discarded("d", "outcome recorded")))
    counts = _count(_runs("t", ("c1", 10.5)), log, Faults(kills={KILLED: 12}))
    assert (counts.lost, counts.explained, counts.after_result) == ([], 0, 0)
    purged = _log("t", (1, lc.Discarded("d", "purged")))
    assert _count(_runs("t", ("c1", 10.5)), purged, Faults()).lost == ["t"]


def test_lost_tasks_and_refused_publishes():
    never_finished = [Run("a", "c1", 1, 1.0)]
    dead = _log("b", (1, lc.DeadLettered("d", "lease ran out")))
    counts = tally({"a": never_finished, "b": _runs("b", ("c", 1))}, {"a": [], "b": dead},
                   ["a", "b", "missing"], ["refused"], Faults())  # fmt: skip
    assert counts.lost == ["a", "b", "missing"]
    assert (counts.tasks, counts.refused) == (3, 1)


def test_a_lost_task_comes_with_its_story():
    """The crash test's one flaky loss: a FAILURE recorded before the body ran (the
    STARTED write failed), then the redelivery settled.  The failure message shows
    the runs (none) and every event, in order."""
    log = _log("t", (1, lc.Published("d", "q", {"body": "x" * 10_000})),
               (10, _claimed("c1", HEALTHY, 14)),
               (16, lc.Failed(exc="DatabaseUnavailable: down", delivery="d")),
               (16, lc.LeaseExpired("d", "c1", started=True)),
               (16, lc.Discarded("d", "outcome recorded")))  # fmt: skip
    counts = _count([], log, Faults())
    assert counts.lost == ["t"]
    story = json.loads(counts.stories(counts.lost))
    assert story["runs"] == []
    assert [(e["at"], e["type"]) for e in story["log"]] == [
        (1, "Published"), (10, "Claimed"), (16, "Failed"), (16, "LeaseExpired"),
        (16, "Discarded"),
    ]
    assert story["log"][2]["exc"] == "DatabaseUnavailable: down"
    assert "message" not in story["log"][0]  # the task's body would drown the story
