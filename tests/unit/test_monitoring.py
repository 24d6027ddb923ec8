"""Which store events become Celery task events (issue 14, item 7): only verdicts
the store made itself; a worker reports its own."""

from __future__ import annotations

from celery_eventstore import lifecycle as lc
from celery_eventstore.monitoring import HOSTNAME, celery_events
from celery_eventstore.storage import RecordedEvent


def recs(*events: tuple[str, lc.Event]) -> list[RecordedEvent]:
    return [RecordedEvent(n, stream, n, ev, None, 1000.0 + n)
            for n, (stream, ev) in enumerate(events, start=1)]


def kinds(events):
    return [(e["type"], e["uuid"]) for e in events]


def test_a_revoke_is_one_task_revoked_whatever_it_discarded():
    out = celery_events(recs(("t1", lc.Revoked("customer cancelled")),
                             ("t1", lc.Discarded("d1", "revoked")),
                             ("t1", lc.Discarded("d2", "revoked"))))
    assert kinds(out) == [("task-revoked", "t1")]
    assert out[0]["expired"] is False and out[0]["terminated"] is False
    assert out[0]["hostname"] == HOSTNAME and out[0]["timestamp"] > 0


def test_expiry_purge_and_dead_letters_by_the_store():
    out = celery_events(recs(("t1", lc.Discarded("d1", "expired")),
                             ("t2", lc.Discarded("d2", "purged")),
                             ("t3", lc.DeadLettered("d3", "5 runs ended without an outcome")),
                             ("t4", lc.Quarantined("d4", "q", "bad row"))))
    assert kinds(out) == [("task-revoked", "t1"), ("task-rejected", "t2"),
                          ("task-failed", "t3"), ("task-failed", "t4")]
    assert out[0]["expired"] is True and out[1]["requeue"] is False
    assert out[2]["exception"].startswith("TaskDeadLettered(")


def test_what_a_worker_reports_itself_is_left_to_it():
    out = celery_events(recs(("t1", lc.Revoked("revoked", result={"body": "x"})),
                             ("t2", lc.DeadLettered("d2", "rejected by the consumer")),
                             ("t3", lc.Discarded("d3", "outcome recorded")),
                             ("t4", lc.Failed("boom")),
                             ("t5", lc.Acked("d5", "c5"))))
    assert out == []
