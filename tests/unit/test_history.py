"""What a task's history shows for each event (``celery_eventstore.history``),
from recorded events made by hand: no database."""

from __future__ import annotations

from typing import Any

from celery_eventstore import lifecycle as lc
from celery_eventstore.history import entries_of
from celery_eventstore.storage import RecordedEvent

STREAM = "t1"


def _recorded(*events: lc.Event) -> list[RecordedEvent]:
    return [
        RecordedEvent(position=n, stream=STREAM, version=n, event=e, metadata=None,
                      recorded_at=1000.0 + n)
        for n, e in enumerate(events, start=1)
    ]


def _details(*events: lc.Event) -> list[tuple[str, int | None, dict[str, Any]]]:
    return [(e.event, e.delivery, e.detail) for e in entries_of(_recorded(*events))]


def test_a_lost_lease_says_whether_the_task_had_started() -> None:
    assert _details(
        lc.Published("d1", "q", {}),
        lc.Claimed("d1", "c1", "w", 1030.0),
        lc.LeaseExpired("d1", "c1", started=False),
        lc.Claimed("d1", "c2", "w", 1060.0),
        lc.LeaseExpired("d1", "c2", started=True),
    )[2:] == [
        ("LeaseExpired", 1, {"started": False}),
        ("Claimed", 1, {"lease_until": "1970-01-01T00:17:40.000+00:00"}),
        ("LeaseExpired", 1, {}),
    ]


def test_a_requeue_says_when_it_was_a_lost_run() -> None:
    assert _details(
        lc.Published("d1", "q", {}),
        lc.Claimed("d1", "c1", "w", 1030.0),
        lc.Requeued("d1", "c1", "rejected and requeued", lost=True),
        lc.Claimed("d1", "c2", "w", 1060.0),
        lc.Requeued("d1", "c2", "restored"),
    )[2::2] == [
        ("Requeued", 1, {"reason": "rejected and requeued", "lost": True}),
        ("Requeued", 1, {"reason": "restored"}),
    ]


def test_results_show_the_attempt_they_came_from_and_fenced_ones_their_worker() -> None:
    details = _details(
        lc.Published("d1", "q", {}),
        lc.Published("d2", "q", {}),
        lc.Claimed("d1", "c1", "w1", 1030.0),
        lc.Claimed("d2", "c2", "w2", 1030.0),
        lc.Started("celery@a", delivery="d1"),
        lc.Claimed("d1", "c3", "w3", 1060.0),
        lc.Succeeded({"body": '{"result": 1}', "encoding": "utf-8"}, delivery="d1"),
        lc.ResultFenced("d1", "c1", "SUCCESS"),
        lc.Started("celery@b"),
    )
    entries = entries_of(_recorded(
        lc.Published("d1", "q", {}),
        lc.Claimed("d1", "c1", "w1", 1030.0),
        lc.Claimed("d1", "c3", "w3", 1060.0),
        lc.ResultFenced("d1", "c1", "SUCCESS"),
    ))
    assert [(e, n) for e, n, _ in details[4:]] == [
        ("Started", 1), ("Claimed", 1), ("Succeeded", 1), ("ResultFenced", 1), ("Started", 1),
    ]
    assert details[7][2] == {"state": "SUCCESS", "claim": "c1"}
    assert entries[-1].worker == "w1"  # the claim's, not the claim that took over
