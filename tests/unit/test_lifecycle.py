"""Example-based tests of the pure job lifecycle (``celery_eventstore.lifecycle``).

Time is always passed in explicitly (``NOW``); nothing here sleeps or touches a
database.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pytest

from celery_eventstore.exceptions import (
    CorruptStream,
    EventStoreError,
    InvalidTransition,
    NotClaimable,
    StaleClaim,
    UnknownDelivery,
)
from celery_eventstore.lifecycle import (
    EVENT_TYPES,
    Ack,
    Acked,
    Claim,
    Claimed,
    DeadLettered,
    DeliveryStatus,
    Discard,
    Discarded,
    Event,
    Fail,
    Failed,
    JobState,
    LeaseExpired,
    LeaseRenewed,
    Publish,
    Published,
    Reject,
    Renew,
    Requeued,
    Restore,
    ResultFenced,
    ResultState,
    RetryScheduled,
    Revoke,
    Revoked,
    ScheduleRetry,
    Start,
    Started,
    Succeed,
    Succeeded,
    UpdateState,
    decide,
    event_data,
    event_from,
    event_type,
    evolve,
    fold,
)
from celery_eventstore.lifecycle.task import UNSTARTED_CLAIMS_FACTOR

STREAM = "task-1"
NOW = 1000.0
LEASE = 30.0
MESSAGE = {"body": "e30=", "headers": {"id": STREAM}, "properties": {"priority": 0}}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


class Job:
    """A stream under test: decides commands and folds their events, like a store."""

    def __init__(self, stream: str = STREAM) -> None:
        self.state = JobState(stream=stream)
        self.events: list[Event] = []

    def do(self, command: Any, now: float = NOW) -> list[Event]:
        events = decide(command, self.state, now)
        for event in events:
            self.state = evolve(self.state, event)
        self.events.extend(events)
        assert self.state == fold(self.state.stream, self.events)
        assert self.state.version == len(self.events)
        return events

    def delivery(self, delivery_id: str = "d1") -> Any:
        return self.state.delivery(delivery_id)

    def refused(self, command: Any, error: type[Exception], now: float = NOW) -> Exception:
        """``command`` raises ``error`` and changes nothing."""
        before = self.state
        with pytest.raises(error) as info:
            decide(command, self.state, now)
        assert self.state == before
        return info.value


def published(job: Job, delivery: str = "d1", **kwargs: Any) -> Job:
    job.do(Publish(delivery, kwargs.pop("queue", "celery"), MESSAGE, **kwargs))
    return job


def claimed(
    job: Job, delivery: str = "d1", claim: str = "c1", consumer: str = "w1", now: float = NOW
) -> Job:
    events = job.do(Claim(delivery, claim, consumer, LEASE, max_claims=3), now)
    assert isinstance(events[-1], Claimed), events
    return job


def fold_all(events: Iterable[Event]) -> JobState:
    return fold(STREAM, events)


# ---------------------------------------------------------------------------
# publish
# ---------------------------------------------------------------------------


def test_a_new_stream_is_empty_and_pending() -> None:
    state = fold_all([])
    assert state == JobState(stream=STREAM)
    assert state.version == 0
    assert state.deliveries == {}
    assert state.result_state is ResultState.PENDING
    assert state.result is None
    assert not state.revoked
    assert state.pending() == []


def test_publish_makes_a_ready_delivery() -> None:
    job = Job()
    events = job.do(Publish("d1", "celery", MESSAGE, priority=5))
    assert events == [Published("d1", "celery", MESSAGE, priority=5)]
    d = job.delivery()
    assert d.status is DeliveryStatus.READY
    assert (d.queue, d.priority, d.not_before, d.expires) == ("celery", 5, None, None)
    assert (d.claim, d.consumer, d.lease_until) == (None, None, None)
    assert (d.claims, d.lost_claims) == (0, 0)
    assert not d.redelivered
    assert d.is_due(NOW)
    assert job.state.pending() == [d]
    assert job.state.version == 1


def test_a_ready_delivery_is_claimable_at_once() -> None:
    job = published(Job())
    events = job.do(Claim("d1", "c1", "w1", LEASE), NOW)
    assert events == [Claimed("d1", "c1", "w1", NOW + LEASE)]


def test_publish_of_an_existing_delivery_to_another_queue_is_refused() -> None:
    job = published(Job())
    job.refused(Publish("d1", "other", MESSAGE), InvalidTransition)


def test_publish_of_an_existing_delivery_again_records_nothing() -> None:
    """A producer that retries a publish it could not confirm sends the same
    delivery again: one delivery, whatever it has become since."""
    job = published(Job())
    job.do(Claim("d1", "c1", "w1", LEASE), NOW)
    before = job.state
    assert job.do(Publish("d1", "celery", {"again": True}), NOW) == []
    assert job.state == before


def test_a_stream_holds_several_deliveries() -> None:
    job = published(published(Job(), "d1"), "d2", queue="high", priority=9)
    assert set(job.state.deliveries) == {"d1", "d2"}
    assert job.delivery("d2").queue == "high"
    claimed(job, "d2", "c2")
    assert job.delivery("d1").status is DeliveryStatus.READY
    assert job.delivery("d2").status is DeliveryStatus.CLAIMED


def test_scheduled_delivery_is_not_claimable_before_not_before() -> None:
    job = published(Job(), not_before=NOW + 60)
    d = job.delivery()
    assert d.not_before == NOW + 60
    assert d.status is DeliveryStatus.READY
    assert not d.is_due(NOW)
    assert not d.is_due(NOW + 59.999)
    job.refused(Claim("d1", "c1", "w1", LEASE), NotClaimable, now=NOW)
    job.refused(Claim("d1", "c1", "w1", LEASE), NotClaimable, now=NOW + 59.999)


def test_scheduled_delivery_is_claimable_at_not_before() -> None:
    job = published(Job(), not_before=NOW + 60)
    events = job.do(Claim("d1", "c1", "w1", LEASE), NOW + 60)
    assert events == [Claimed("d1", "c1", "w1", NOW + 60 + LEASE)]


def test_scheduled_delivery_is_claimable_after_not_before() -> None:
    job = published(Job(), not_before=NOW + 60)
    events = job.do(Claim("d1", "c1", "w1", LEASE), NOW + 3600)
    assert events == [Claimed("d1", "c1", "w1", NOW + 3600 + LEASE)]


# ---------------------------------------------------------------------------
# expiry
# ---------------------------------------------------------------------------


def test_claim_past_expires_discards_the_delivery() -> None:
    job = published(Job(), expires=NOW + 10)
    events = job.do(Claim("d1", "c1", "w1", LEASE), NOW + 10)
    assert events == [Discarded("d1", "expired")]
    assert not any(isinstance(e, Claimed) for e in events)
    d = job.delivery()
    assert d.status is DeliveryStatus.DISCARDED
    assert d.reason == "expired"
    assert d.claims == 0
    assert d.claim is None
    assert job.state.pending() == []


def test_a_task_that_expired_unrun_reports_revoked() -> None:
    job = published(Job(), expires=NOW)
    job.do(Claim("d1", "c1", "w1", LEASE), NOW)
    assert job.state.result_state is ResultState.REVOKED  # as Celery's worker says
    assert not job.state.revoked  # but it was not revoked: a new publish may run


def test_an_expired_retry_keeps_the_result_state() -> None:
    job = published(Job(), "d1", expires=NOW + 5)
    job.do(Start("w1"))
    job.do(Fail("boom"))
    published(job, "d2", expires=NOW + 5)
    assert job.do(Claim("d2", "c1", "w1", LEASE), NOW + 5) == [Discarded("d2", "expired")]
    assert job.state.result_state is ResultState.FAILURE


def test_claim_well_past_expires_discards_the_delivery() -> None:
    job = published(Job(), expires=NOW - 1)
    assert job.do(Claim("d1", "c1", "w1", LEASE), NOW) == [Discarded("d1", "expired")]


def test_claim_before_expires_claims() -> None:
    job = published(Job(), expires=NOW + 10)
    events = job.do(Claim("d1", "c1", "w1", LEASE), NOW + 9.5)
    assert events == [Claimed("d1", "c1", "w1", NOW + 9.5 + LEASE)]


def test_an_expired_delivery_is_not_claimable_again() -> None:
    job = published(Job(), expires=NOW)
    job.do(Claim("d1", "c1", "w1", LEASE), NOW)
    job.refused(Claim("d1", "c2", "w2", LEASE), NotClaimable, now=NOW + 1)


def test_lease_expiry_of_an_expired_delivery_discards_it() -> None:
    job = claimed(published(Job(), expires=NOW + 10))
    events = job.do(Claim("d1", "c2", "w2", LEASE), NOW + LEASE)
    assert events == [LeaseExpired("d1", "c1", started=False), Discarded("d1", "expired")]
    assert job.delivery().status is DeliveryStatus.DISCARDED


# ---------------------------------------------------------------------------
# claim, lease, renewal
# ---------------------------------------------------------------------------


def test_claim_sets_a_lease_of_lease_seconds_from_now() -> None:
    job = published(Job())
    events = job.do(Claim("d1", "c1", "w1", 45.0), NOW + 5)
    assert events == [Claimed("d1", "c1", "w1", lease_until=NOW + 5 + 45.0)]
    d = job.delivery()
    assert d.status is DeliveryStatus.CLAIMED
    assert (d.claim, d.consumer, d.lease_until) == ("c1", "w1", NOW + 50.0)
    assert (d.claims, d.lost_claims) == (1, 0)
    assert not d.lease_expired(NOW + 49.999)
    assert d.lease_expired(NOW + 50.0)
    assert job.state.pending() == [d]


def test_claim_of_a_live_claimed_delivery_raises_not_claimable() -> None:
    job = claimed(published(Job()))
    job.refused(Claim("d1", "c2", "w2", LEASE), NotClaimable, now=NOW)
    # Still live one instant before the lease ends.
    job.refused(Claim("d1", "c2", "w2", LEASE), NotClaimable, now=NOW + LEASE - 0.001)
    assert job.delivery().claim == "c1"


def test_claim_of_an_unknown_delivery_raises_unknown_delivery() -> None:
    job = published(Job())
    error = job.refused(Claim("nope", "c1", "w1", LEASE), UnknownDelivery)
    assert isinstance(error, InvalidTransition)


def test_claim_of_a_settled_delivery_raises_not_claimable() -> None:
    job = claimed(published(Job()))
    job.do(Ack("d1", "c1"))
    job.refused(Claim("d1", "c2", "w2", LEASE), NotClaimable, now=NOW + 3600)


def test_renewal_extends_the_lease() -> None:
    job = claimed(published(Job()))
    events = job.do(Renew("d1", "c1", 60.0), NOW + 20)
    assert events == [LeaseRenewed("d1", "c1", NOW + 20 + 60.0)]
    d = job.delivery()
    assert d.lease_until == NOW + 80.0
    assert d.status is DeliveryStatus.CLAIMED
    assert d.claims == 1
    # The old lease end has passed but the renewed lease holds: not claimable.
    job.refused(Claim("d1", "c2", "w2", LEASE), NotClaimable, now=NOW + LEASE + 1)
    job.refused(Claim("d1", "c2", "w2", LEASE), NotClaimable, now=NOW + 79.999)
    events = job.do(Claim("d1", "c2", "w2", LEASE), NOW + 80.0)
    assert events[0] == LeaseExpired("d1", "c1", started=False)


def test_renewal_can_be_repeated() -> None:
    job = claimed(published(Job()))
    for t in (10.0, 20.0, 30.0):
        job.do(Renew("d1", "c1", LEASE), NOW + t)
        assert job.delivery().lease_until == NOW + t + LEASE


def test_ack_settles_the_delivery() -> None:
    job = claimed(published(Job()))
    assert job.do(Ack("d1", "c1"), NOW + 1) == [Acked("d1", "c1")]
    d = job.delivery()
    assert d.status is DeliveryStatus.ACKED
    assert d.status.is_final
    assert d.lease_until is None
    assert job.state.pending() == []


# ---------------------------------------------------------------------------
# fencing: stale claims
# ---------------------------------------------------------------------------


STALE_COMMANDS = [
    pytest.param(lambda claim: Renew("d1", claim, LEASE), id="renew"),
    pytest.param(lambda claim: Ack("d1", claim), id="ack"),
    pytest.param(lambda claim: Reject("d1", claim, requeue=True), id="reject-requeue"),
    pytest.param(lambda claim: Reject("d1", claim, requeue=False), id="reject-dead"),
    pytest.param(lambda claim: Restore("d1", claim), id="restore"),
]


@pytest.mark.parametrize("make", STALE_COMMANDS)
def test_wrong_claim_id_raises_stale_claim(make: Any) -> None:
    job = claimed(published(Job()))
    error = job.refused(make("not-c1"), StaleClaim)
    assert isinstance(error, InvalidTransition)


@pytest.mark.parametrize("make", STALE_COMMANDS)
def test_claim_id_of_an_unclaimed_delivery_raises_stale_claim(make: Any) -> None:
    job = published(Job())
    job.refused(make("c1"), StaleClaim)


@pytest.mark.parametrize("make", STALE_COMMANDS)
def test_claim_id_of_an_unknown_delivery_raises_stale_claim(make: Any) -> None:
    job = Job()
    job.refused(make("c1"), StaleClaim)


@pytest.mark.parametrize("make", STALE_COMMANDS)
def test_old_claim_after_reclaim_by_someone_else_raises_stale_claim(make: Any) -> None:
    """Fencing: once the lease ran out and w2 claimed, w1's claim changes nothing."""
    job = claimed(published(Job()), claim="c1", consumer="w1")
    job.do(Claim("d1", "c2", "w2", LEASE, max_claims=3), NOW + LEASE + 1)
    assert job.delivery().claim == "c2"
    job.refused(make("c1"), StaleClaim, now=NOW + LEASE + 2)
    # The current holder is not affected.
    job.do(make("c2"), NOW + LEASE + 2)


def test_ack_after_reclaim_by_someone_else_is_fenced_off() -> None:
    job = claimed(published(Job()), claim="c1", consumer="w1")
    job.do(Claim("d1", "c2", "w2", LEASE), NOW + LEASE)
    job.refused(Ack("d1", "c1"), StaleClaim, now=NOW + LEASE + 1)
    assert job.delivery().status is DeliveryStatus.CLAIMED
    assert job.do(Ack("d1", "c2"), NOW + LEASE + 1) == [Acked("d1", "c2")]
    assert job.delivery().status is DeliveryStatus.ACKED
    # And after the ack even the holder's claim is stale.
    job.refused(Ack("d1", "c2"), StaleClaim, now=NOW + LEASE + 2)
    job.refused(Ack("d1", "c1"), StaleClaim, now=NOW + LEASE + 2)


@pytest.mark.parametrize("make", STALE_COMMANDS)
def test_claim_id_of_a_settled_delivery_raises_stale_claim(make: Any) -> None:
    job = claimed(published(Job()))
    job.do(Ack("d1", "c1"))
    job.refused(make("c1"), StaleClaim)


@pytest.mark.parametrize("make", STALE_COMMANDS)
def test_claim_id_after_restore_raises_stale_claim(make: Any) -> None:
    job = claimed(published(Job()))
    job.do(Restore("d1", "c1"))
    job.refused(make("c1"), StaleClaim)


def test_claim_of_another_delivery_does_not_fence_this_one() -> None:
    job = claimed(claimed(published(published(Job(), "d1"), "d2"), "d1", "c1"), "d2", "c2")
    job.refused(Ack("d1", "c2"), StaleClaim)
    job.refused(Ack("d2", "c1"), StaleClaim)
    job.do(Ack("d1", "c1"))
    job.do(Ack("d2", "c2"))


# ---------------------------------------------------------------------------
# lease expiry, redelivery, dead-lettering
# ---------------------------------------------------------------------------


def test_lease_expiry_then_reclaim_yields_lease_expired_and_claimed() -> None:
    job = claimed(published(Job()), claim="c1", consumer="w1")
    later = NOW + LEASE + 5
    events = job.do(Claim("d1", "c2", "w2", LEASE, max_claims=3), later)
    assert events == [
        LeaseExpired("d1", "c1", started=False), Claimed("d1", "c2", "w2", later + LEASE)
    ]
    d = job.delivery()
    assert d.status is DeliveryStatus.CLAIMED
    assert (d.claim, d.consumer, d.lease_until) == ("c2", "w2", later + LEASE)
    assert (d.claims, d.lost_claims, d.lost_unstarted) == (2, 0, 1)
    assert d.redelivered  # the claim before this one was lost


def test_reclaim_exactly_at_lease_end_is_allowed() -> None:
    job = claimed(published(Job()))
    events = job.do(Claim("d1", "c2", "w2", LEASE), NOW + LEASE)
    assert [type(e) for e in events] == [LeaseExpired, Claimed]


def test_first_claim_is_not_redelivered() -> None:
    job = published(Job())
    assert not job.delivery().redelivered  # nothing claimed yet
    claimed(job)
    assert job.delivery().claims == 1
    assert not job.delivery().redelivered  # the current claim is the first


@pytest.mark.parametrize(
    "give_back",
    [
        pytest.param(lambda job: job.do(Restore("d1", "c1")), id="restore"),
        pytest.param(lambda job: job.do(Reject("d1", "c1", requeue=True)), id="requeue"),
    ],
)
def test_a_given_back_delivery_is_redelivered(give_back: Any) -> None:
    job = claimed(published(Job()))
    give_back(job)
    assert job.delivery().redelivered  # the next claim is a redelivery
    claimed(job, claim="c2")
    assert job.delivery().claims == 2
    assert job.delivery().redelivered


def _lose_lease(job: Job, claim: str, now: float, *, start: bool = True) -> list[Event]:
    """Claim at ``now`` (with max_claims=3) after the previous lease ran out; the
    task then records its start, unless ``start`` is False."""
    events = job.do(Claim("d1", claim, "w", LEASE, max_claims=3), now)
    if start and isinstance(events[-1], Claimed):
        job.do(Start("w"), now)
    return events


def test_dead_letter_after_max_claims_lost_leases() -> None:
    job = published(Job())
    t = NOW
    assert [type(e) for e in _lose_lease(job, "c1", t)] == [Claimed]
    t += LEASE
    assert [type(e) for e in _lose_lease(job, "c2", t)] == [LeaseExpired, Claimed]
    t += LEASE
    assert [type(e) for e in _lose_lease(job, "c3", t)] == [LeaseExpired, Claimed]
    assert job.delivery().lost_claims == 2
    t += LEASE
    events = _lose_lease(job, "c4", t)
    assert events == [
        LeaseExpired("d1", "c3"),
        DeadLettered("d1", "3 runs ended without an outcome (lease expired or requeued)"),
    ]
    d = job.delivery()
    assert d.status is DeliveryStatus.DEAD
    assert d.reason == "3 runs ended without an outcome (lease expired or requeued)"
    assert "lease expired" in d.reason
    assert (d.claims, d.lost_claims, d.lost_unstarted) == (3, 3, 0)
    assert d.lease_until is None
    job.refused(Claim("d1", "c5", "w", LEASE, max_claims=3), NotClaimable, now=t + LEASE)


def test_no_max_claims_means_no_dead_letter() -> None:
    job = published(Job())
    t = NOW
    for n in range(10):
        events = job.do(Claim("d1", f"c{n}", "w", LEASE), t)
        assert isinstance(events[-1], Claimed)
        job.do(Start("w"), t)
        t += LEASE
    assert job.delivery().lost_claims == 9


def test_max_claims_one_dead_letters_on_the_first_lost_lease() -> None:
    job = published(Job())
    job.do(Claim("d1", "c1", "w", LEASE, max_claims=1))
    job.do(Start("w"))
    events = job.do(Claim("d1", "c2", "w", LEASE, max_claims=1), NOW + LEASE)
    assert [type(e) for e in events] == [LeaseExpired, DeadLettered]


def test_a_lease_lost_before_a_start_spends_a_larger_budget() -> None:
    """A message prefetched beside a task that kills its worker loses its lease
    with it, without ever starting: it is not the suspect."""
    job = published(Job())
    t = NOW
    assert [type(e) for e in _lose_lease(job, "c0", t, start=False)] == [Claimed]
    for n in range(1, 9):  # 3 * max_claims - 1 leases lost before a start: still claimed
        t += LEASE
        events = _lose_lease(job, f"c{n}", t, start=False)
        assert events == [
            LeaseExpired("d1", f"c{n - 1}", started=False), Claimed("d1", f"c{n}", "w", t + LEASE)
        ]
    assert (job.delivery().lost_claims, job.delivery().lost_unstarted) == (0, 8)
    t += LEASE
    events = _lose_lease(job, "c9", t, start=False)
    assert events == [
        LeaseExpired("d1", "c8", started=False),
        DeadLettered("d1", "lost its lease 9 times before it started"),
    ]
    assert UNSTARTED_CLAIMS_FACTOR == 3


def test_the_budgets_are_counted_apart() -> None:
    job = published(Job())
    t = NOW
    for n, start in enumerate([True, False, True, False, False]):
        events = _lose_lease(job, f"c{n}", t, start=start)
        assert isinstance(events[-1], Claimed), events
        t += LEASE
    d = job.delivery()
    assert (d.lost_claims, d.lost_unstarted) == (2, 2)  # the fifth claim still holds
    assert [type(e) for e in _lose_lease(job, "c5", t, start=True)] == [LeaseExpired, Claimed]
    t += LEASE
    assert _lose_lease(job, "c6", t)[-1] == DeadLettered(
        "d1", "3 runs ended without an outcome (lease expired or requeued)"
    )


def test_started_belongs_to_the_claim_that_saw_it() -> None:
    job = claimed(published(Job()))
    job.do(Start("w1"))
    assert job.delivery().started
    events = job.do(Claim("d1", "c2", "w2", LEASE, max_claims=3), NOW + LEASE)
    assert events[0] == LeaseExpired("d1", "c1", started=True)
    assert not job.delivery().started  # c2 has not started (yet)
    events = job.do(Claim("d1", "c3", "w3", LEASE, max_claims=3), NOW + 2 * LEASE)
    assert events[0] == LeaseExpired("d1", "c2", started=False)
    assert (job.delivery().lost_claims, job.delivery().lost_unstarted) == (1, 1)


@pytest.mark.parametrize(
    "command",
    [
        Start("w1"),
        UpdateState("PROGRESS"),
        ScheduleRetry("Retry"),
        Fail("boom"),
    ],
    ids=["start", "custom-state", "retry", "fail"],
)
def test_any_result_state_shows_the_claim_started(command: Any) -> None:
    job = claimed(published(Job()))
    job.do(command)
    assert job.delivery().started


def test_a_start_after_the_ack_changes_no_delivery() -> None:
    """By default Celery acks before the task runs: the start comes after."""
    job = claimed(published(Job()))
    job.do(Ack("d1", "c1"))
    acked = job.delivery()
    job.do(Start("w1"))
    assert job.delivery() == acked


def test_restore_does_not_count_as_a_lost_claim() -> None:
    job = published(Job())
    for n in range(10):  # far more than max_claims
        events = job.do(Claim("d1", f"c{n}", "w", LEASE, max_claims=3), NOW + n)
        assert [type(e) for e in events] == [Claimed]
        events = job.do(Restore("d1", f"c{n}"), NOW + n)
        assert events == [Requeued("d1", f"c{n}", "restored")]
        d = job.delivery()
        assert d.status is DeliveryStatus.READY
        assert (d.claim, d.consumer, d.lease_until) == (None, None, None)
        assert d.lost_claims == 0
        assert d.claims == n + 1


def test_a_requeue_counts_as_a_lost_run_and_dead_letters_after_max_claims() -> None:
    """Celery rejects with requeue when the pool process running the task died
    (``task_reject_on_worker_lost``): a poison task must not loop forever."""
    job = published(Job())
    for n in range(3):
        assert [type(e) for e in job.do(Claim("d1", f"c{n}", "w", LEASE, max_claims=3))] == [
            Claimed
        ]
        events = job.do(Reject("d1", f"c{n}", requeue=True, reason="rejected and requeued"))
        assert events == [Requeued("d1", f"c{n}", "rejected and requeued", lost=True)]
        assert job.delivery().lost_claims == n + 1
        assert job.delivery().status is DeliveryStatus.READY
    events = job.do(Claim("d1", "c3", "w", LEASE, max_claims=3))
    assert events == [
        DeadLettered("d1", "3 runs ended without an outcome (lease expired or requeued)")
    ]
    assert job.delivery().status is DeliveryStatus.DEAD


def test_lost_leases_and_requeues_share_the_budget() -> None:
    job = published(Job())
    job.do(Claim("d1", "c1", "w", LEASE, max_claims=2))
    job.do(Reject("d1", "c1", requeue=True))
    job.do(Claim("d1", "c2", "w", LEASE, max_claims=2))
    job.do(Start("w"))
    events = job.do(Claim("d1", "c3", "w", LEASE, max_claims=2), NOW + LEASE)
    assert [type(e) for e in events] == [LeaseExpired, DeadLettered]
    assert job.delivery().lost_claims == 2


def test_restore_of_a_started_task_is_a_lost_run() -> None:
    """A cold shutdown gives back the task it interrupted: a run without an outcome."""
    job = claimed(published(Job()))
    job.do(Start("w1"))
    assert job.do(Restore("d1", "c1")) == [Requeued("d1", "c1", "restored", lost=True)]
    assert job.delivery().lost_claims == 1
    assert not job.delivery().started


def test_restore_requeues_with_reason_restored() -> None:
    job = claimed(published(Job()))
    assert job.do(Restore("d1", "c1")) == [Requeued("d1", "c1", "restored")]
    d = job.delivery()
    assert d.status is DeliveryStatus.READY
    assert d.reason == "restored"
    assert d.is_due(NOW)


def test_reject_with_requeue_makes_the_delivery_ready_again() -> None:
    job = claimed(published(Job()))
    events = job.do(Reject("d1", "c1", requeue=True))
    assert events == [Requeued("d1", "c1", "rejected", None, lost=True)]
    d = job.delivery()
    assert d.status is DeliveryStatus.READY
    assert d.reason == "rejected"
    assert d.lost_claims == 1
    assert [type(e) for e in job.do(Claim("d1", "c2", "w2", LEASE), NOW)] == [Claimed]


def test_reject_without_requeue_dead_letters() -> None:
    job = claimed(published(Job()))
    events = job.do(Reject("d1", "c1", requeue=False, reason="poison"))
    assert events == [DeadLettered("d1", "poison")]
    d = job.delivery()
    assert d.status is DeliveryStatus.DEAD
    assert d.reason == "poison"
    assert d.lease_until is None
    assert d.lost_claims == 0
    job.refused(Claim("d1", "c2", "w2", LEASE), NotClaimable, now=NOW + 3600)


def test_reject_default_reason_is_rejected() -> None:
    job = claimed(published(Job()))
    assert job.do(Reject("d1", "c1", requeue=False)) == [DeadLettered("d1", "rejected")]


def test_reject_with_countdown_schedules_the_requeue() -> None:
    job = claimed(published(Job()))
    events = job.do(Reject("d1", "c1", requeue=True, countdown=15.0), NOW + 2)
    assert events == [Requeued("d1", "c1", "rejected", NOW + 17.0, lost=True)]
    d = job.delivery()
    assert d.not_before == NOW + 17.0
    assert not d.is_due(NOW + 16.9)
    job.refused(Claim("d1", "c2", "w2", LEASE), NotClaimable, now=NOW + 16.9)
    assert [type(e) for e in job.do(Claim("d1", "c2", "w2", LEASE), NOW + 17.0)] == [Claimed]


def test_reject_without_countdown_keeps_the_original_not_before() -> None:
    job = published(Job(), not_before=NOW - 10)
    claimed(job)
    job.do(Reject("d1", "c1", requeue=True))
    assert job.delivery().not_before == NOW - 10


# ---------------------------------------------------------------------------
# discard and revoke
# ---------------------------------------------------------------------------


def test_discard_drops_a_ready_delivery_and_is_idempotent() -> None:
    job = published(Job())
    assert job.do(Discard("d1", "purged")) == [Discarded("d1", "purged")]
    assert job.delivery().status is DeliveryStatus.DISCARDED
    assert job.delivery().reason == "purged"
    assert job.do(Discard("d1", "purged")) == []


def test_discard_of_a_claimed_delivery_is_refused() -> None:
    job = claimed(published(Job()))
    job.refused(Discard("d1", "purged"), InvalidTransition)


def test_discard_of_an_unknown_delivery_is_refused() -> None:
    Job().refused(Discard("d1", "purged"), UnknownDelivery)


def test_revoke_discards_pending_unclaimed_deliveries() -> None:
    job = Job()
    published(job, "ready")
    published(job, "scheduled", not_before=NOW + 60)
    published(job, "claimed")
    claimed(job, "claimed", "c1")
    published(job, "acked")
    claimed(job, "acked", "c2")
    job.do(Ack("acked", "c2"))
    events = job.do(Revoke())
    assert events[0] == Revoked("revoked")
    assert sorted(events[1:], key=lambda e: e.delivery) == [  # type: ignore[union-attr]
        Discarded("ready", "revoked"),
        Discarded("scheduled", "revoked"),
    ]
    assert job.state.revoked
    assert job.state.result_state is ResultState.REVOKED
    assert job.delivery("ready").status is DeliveryStatus.DISCARDED
    assert job.delivery("ready").reason == "revoked"
    assert job.delivery("scheduled").status is DeliveryStatus.DISCARDED
    assert job.delivery("claimed").status is DeliveryStatus.CLAIMED
    assert job.delivery("acked").status is DeliveryStatus.ACKED
    assert [d.id for d in job.state.pending()] == ["claimed"]


def test_revoke_leaves_a_started_task_its_state_and_its_run() -> None:
    # As Celery's backends: a revoke without terminate does not stop a running
    # task, so its state stays the running worker's to report.
    job = claimed(published(Job()))
    job.do(Start("w1"))
    assert job.do(Revoke()) == [Revoked("revoked")]
    assert job.state.revoked and job.state.result_state is ResultState.STARTED
    job.do(Ack("d1", "c1"))
    job.do(Succeed({"value": 1}))
    assert job.state.result_state is ResultState.SUCCESS


def test_revoke_leaves_a_custom_state_such_as_progress() -> None:
    job = Job()
    job.do(UpdateState("PROGRESS", {"done": 3}))
    job.do(Revoke())
    assert job.state.revoked
    assert (job.state.result_state, job.state.custom_state) == (ResultState.STARTED, "PROGRESS")


def test_revoked_started_task_whose_run_is_lost_reports_revoked() -> None:
    job = claimed(published(Job()))
    job.do(Start("w1"))
    job.do(Revoke())
    # The worker died: the next claim finds the lease run out and a revoked task.
    events = job.do(Claim("d1", "c2", "w2", LEASE), NOW + LEASE + 1)
    assert events == [LeaseExpired("d1", "c1", started=True), Discarded("d1", "revoked")]
    assert job.state.result_state is ResultState.REVOKED


def test_revoke_with_a_reason() -> None:
    job = published(Job())
    assert job.do(Revoke("terminated"))[0] == Revoked("terminated")


def test_publish_after_revoke_is_discarded_as_revoked() -> None:
    job = Job()
    job.do(Revoke())
    events = job.do(Publish("d1", "celery", MESSAGE))
    assert events == [Published("d1", "celery", MESSAGE), Discarded("d1", "revoked")]
    d = job.delivery()
    assert d.status is DeliveryStatus.DISCARDED
    assert d.reason == "revoked"
    job.refused(Claim("d1", "c1", "w1", LEASE), NotClaimable)


def test_revoke_is_idempotent() -> None:
    job = published(Job())
    first = job.do(Revoke())
    assert len(first) == 2
    version = job.state.version
    state = job.state
    assert job.do(Revoke()) == []
    assert job.do(Revoke("again")) == []
    assert job.state == state
    assert job.state.version == version


def test_revoke_keeps_success() -> None:
    job = Job()
    job.do(Succeed({"value": 1}))
    assert job.do(Revoke()) == [Revoked("revoked")]
    assert job.state.revoked
    assert job.state.result_state is ResultState.SUCCESS
    assert job.state.result == {"value": 1}


def test_a_delivery_restored_after_revoke_is_discarded() -> None:
    job = claimed(published(Job()))
    job.do(Revoke())
    events = job.do(Restore("d1", "c1"), NOW + 1)
    assert events == [Requeued("d1", "c1", "restored"), Discarded("d1", "revoked")]
    assert job.delivery().status is DeliveryStatus.DISCARDED
    assert job.delivery().reason == "revoked"
    job.refused(Claim("d1", "c2", "w2", LEASE), NotClaimable, now=NOW + 2)


def test_a_delivery_requeued_after_revoke_is_discarded() -> None:
    job = claimed(published(Job()))
    job.do(Revoke())
    events = job.do(Reject("d1", "c1", requeue=True, countdown=5.0), NOW + 1)
    assert events == [
        Requeued("d1", "c1", "rejected", NOW + 6.0, lost=True), Discarded("d1", "revoked")
    ]
    assert job.delivery().status is DeliveryStatus.DISCARDED


def test_a_lost_lease_after_revoke_discards_instead_of_claiming() -> None:
    job = claimed(published(Job()))
    job.do(Revoke())
    events = job.do(Claim("d1", "c2", "w2", LEASE, max_claims=3), NOW + LEASE)
    assert events == [LeaseExpired("d1", "c1", started=False), Discarded("d1", "revoked")]
    assert job.delivery().status is DeliveryStatus.DISCARDED
    assert job.delivery().claims == 1


def test_the_holder_may_still_settle_a_delivery_claimed_before_revoke() -> None:
    job = claimed(published(Job()))
    job.do(Revoke())
    assert job.delivery().status is DeliveryStatus.CLAIMED
    job.do(Renew("d1", "c1", LEASE), NOW + 1)
    assert job.do(Ack("d1", "c1"), NOW + 2) == [Acked("d1", "c1")]


@pytest.mark.parametrize(
    "give_back",
    [
        pytest.param(lambda job: job.do(Restore("d1", "c1")), id="restore"),
        pytest.param(lambda job: job.do(Reject("d1", "c1", requeue=True)), id="requeue"),
        pytest.param(lambda job: None, id="lease-expired"),
    ],
)
def test_a_revoked_task_is_never_claimed_again(give_back: Any) -> None:
    job = claimed(published(Job()))
    job.do(Revoke())
    give_back(job)
    try:
        events = job.do(Claim("d1", "c2", "w2", LEASE), NOW + LEASE)
    except NotClaimable:
        events = []
    assert not any(isinstance(e, Claimed) for e in events)
    assert job.delivery().status is DeliveryStatus.DISCARDED


# ---------------------------------------------------------------------------
# result states
# ---------------------------------------------------------------------------


def test_start_records_started() -> None:
    job = Job()
    assert job.do(Start("w1")) == [Started("w1", None)]
    assert job.state.result_state is ResultState.STARTED


def test_schedule_retry_records_retry() -> None:
    job = Job()
    events = job.do(ScheduleRetry("Retry(boom)", 5.0, {"exc": "boom"}))
    assert events == [RetryScheduled("Retry(boom)", 5.0, {"exc": "boom"})]
    assert job.state.result_state is ResultState.RETRY
    assert job.state.result == {"exc": "boom"}


def test_fail_records_failure() -> None:
    job = Job()
    events = job.do(Fail("ValueError('x')", "Traceback ...", {"exc_type": "ValueError"}))
    assert events == [Failed("ValueError('x')", "Traceback ...", {"exc_type": "ValueError"})]
    assert job.state.result_state is ResultState.FAILURE
    assert job.state.result == {"exc_type": "ValueError"}


def test_succeed_records_success() -> None:
    job = Job()
    job.do(Start("w1"))
    assert job.do(Succeed({"value": 42})) == [Succeeded({"value": 42})]
    assert job.state.result_state is ResultState.SUCCESS
    assert job.state.result == {"value": 42}


def test_results_follow_each_other_until_success() -> None:
    job = Job()
    job.do(Start("w1"))
    seen = [job.state.result_state]
    for command in (
        ScheduleRetry("Retry", 1.0),
        Fail("boom", result={"exc": "boom"}),
        Start("w2"),
        Succeed({"ok": True}),
    ):
        job.do(command)
        seen.append(job.state.result_state)
    assert seen == [
        ResultState.STARTED,
        ResultState.RETRY,
        ResultState.FAILURE,
        ResultState.STARTED,
        ResultState.SUCCESS,
    ]


@pytest.mark.parametrize(
    "command",
    [
        Start("w2"),
        ScheduleRetry("Retry", 1.0),
        Succeed({"value": 2}),
        Fail("boom", "tb", {"exc": "boom"}),
    ],
    ids=["start", "retry", "succeed", "fail"],
)
def test_a_result_write_after_success_produces_no_events(command: Any) -> None:
    job = Job()
    job.do(Succeed({"value": 1}))
    state = job.state
    assert job.do(command) == []
    assert job.state == state
    assert job.state.result_state is ResultState.SUCCESS
    assert job.state.result == {"value": 1}


def test_not_a_command_is_refused() -> None:
    with pytest.raises(InvalidTransition):
        decide(object(), JobState(stream=STREAM), NOW)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# a finished task is not run again
# ---------------------------------------------------------------------------

FINAL = [
    pytest.param(Succeed({"v": 1}), id="success"),
    pytest.param(Fail("boom", result={"exc": "boom"}), id="failure"),
]


@pytest.mark.parametrize("outcome", FINAL)
def test_a_lost_lease_after_the_outcome_settles_the_delivery(outcome: Any) -> None:
    """The worker died after recording the result, before its ack was written."""
    job = claimed(published(Job()))
    job.do(Start("w1"))
    job.do(outcome)
    state = job.state.result_state
    events = job.do(Claim("d1", "c2", "w2", LEASE, max_claims=3), NOW + LEASE)
    assert events == [LeaseExpired("d1", "c1", started=True), Discarded("d1", "outcome recorded")]
    assert job.delivery().status is DeliveryStatus.DISCARDED
    assert job.state.result_state is state
    assert job.state.pending() == []


@pytest.mark.parametrize(
    "give_back",
    [
        pytest.param(Reject("d1", "c1", requeue=True), id="reject-requeue"),
        pytest.param(Restore("d1", "c1"), id="restore"),
    ],
)
@pytest.mark.parametrize("outcome", FINAL)
def test_a_delivery_given_back_after_the_outcome_is_settled(outcome: Any, give_back: Any) -> None:
    job = claimed(published(Job()))
    job.do(outcome)
    events = job.do(give_back)
    assert [type(e) for e in events] == [Requeued, Discarded]
    assert events[1] == Discarded("d1", "outcome recorded")


def test_a_ready_delivery_claimed_before_the_outcome_is_settled() -> None:
    """Given back (without an outcome), then another delivery of the task finished."""
    job = claimed(published(published(Job()), "d2"), "d2", "c2")
    job.do(Reject("d2", "c2", requeue=True))
    claimed(job, "d1", "c1")
    job.do(Succeed({"v": 1}))
    assert job.do(Claim("d2", "c3", "w", LEASE)) == [Discarded("d2", "outcome recorded")]


def test_an_outcome_from_another_delivery_settles_a_lost_one() -> None:
    job = claimed(published(published(Job()), "d2"), "d1", "c1")
    claimed(job, "d2", "c2")
    job.do(Succeed({"v": 2}))  # d2's run, beside d1's
    events = job.do(Claim("d1", "c3", "w", LEASE), NOW + LEASE)
    assert events[-1] == Discarded("d1", "outcome recorded")


def test_a_fresh_publish_of_a_finished_task_still_runs() -> None:
    job = claimed(published(Job()))
    job.do(Fail("boom"))
    job.do(Ack("d1", "c1"))
    published(job, "d2")
    events = job.do(Claim("d2", "c2", "w", LEASE))
    assert events == [Claimed("d2", "c2", "w", NOW + LEASE)]
    # ... and if its worker dies, it runs again: the outcome is older than its claim.
    events = job.do(Claim("d2", "c3", "w", LEASE), NOW + LEASE)
    assert [type(e) for e in events] == [LeaseExpired, Claimed]


def test_a_retry_is_not_an_outcome() -> None:
    job = claimed(published(Job()))
    job.do(ScheduleRetry("Retry", 5.0))
    events = job.do(Claim("d1", "c2", "w", LEASE), NOW + LEASE)
    assert [type(e) for e in events] == [LeaseExpired, Claimed]


def test_a_dead_letter_is_not_an_outcome() -> None:
    """A dead letter makes the result FAILURE; one retried from the dead letters runs,
    and runs again if its worker dies."""
    job = claimed(published(Job()))
    job.do(Reject("d1", "c1", requeue=False, reason="poison"))
    assert job.state.result_state is ResultState.FAILURE
    published(job, "d2", retry_of="d1")
    claimed(job, "d2", "c2")
    events = job.do(Claim("d2", "c3", "w", LEASE), NOW + LEASE)
    assert [type(e) for e in events] == [LeaseExpired, Claimed]


# ---------------------------------------------------------------------------
# results come from a claim: fencing, and the first final outcome
# ---------------------------------------------------------------------------


def test_a_result_from_the_current_claim_names_its_delivery() -> None:
    job = claimed(published(Job()))
    assert job.do(Start("w1", claim="c1")) == [Started("w1", delivery="d1")]
    assert job.delivery().started
    assert job.do(Succeed({"v": 1}, claim="c1")) == [Succeeded({"v": 1}, delivery="d1")]
    assert job.state.result_state is ResultState.SUCCESS


def test_a_result_from_the_claim_that_acked_is_recorded() -> None:
    """By default Celery acks before the task runs."""
    job = claimed(published(Job()))
    job.do(Ack("d1", "c1"))
    assert job.do(Fail("boom", claim="c1")) == [Failed("boom", delivery="d1")]


@pytest.mark.parametrize("late", [LEASE + 1, 10 * LEASE])
def test_a_result_after_the_lease_ran_out_is_recorded_while_nobody_took_over(
    late: float,
) -> None:
    job = claimed(published(Job()))
    assert job.do(Succeed({"v": 1}, claim="c1"), NOW + late) == [
        Succeeded({"v": 1}, delivery="d1")
    ]


def test_a_result_after_the_delivery_was_dead_lettered_is_recorded() -> None:
    """Its lease ran out and the next claim dead-lettered it: no claim took over."""
    job = claimed(published(Job()))
    job.do(Start("w1", claim="c1"))
    job.do(Claim("d1", "c2", "w2", LEASE, max_claims=1), NOW + LEASE)
    assert job.delivery().status is DeliveryStatus.DEAD
    assert job.do(Succeed({"v": 1}, claim="c1")) == [Succeeded({"v": 1}, delivery="d1")]
    assert job.state.result_state is ResultState.SUCCESS


@pytest.mark.parametrize(
    ("command", "state"),
    [
        (Start("w1", claim="c1"), "STARTED"),
        (UpdateState("PROGRESS", claim="c1"), "PROGRESS"),
        (ScheduleRetry("Retry", claim="c1"), "RETRY"),
        (Succeed({"v": "old"}, claim="c1"), "SUCCESS"),
        (Fail("boom", claim="c1"), "FAILURE"),
    ],
)
def test_a_result_from_a_claim_taken_over_is_fenced(command: Any, state: str) -> None:
    job = claimed(published(Job()))
    job.do(Claim("d1", "c2", "w2", LEASE), NOW + LEASE)  # c1's lease ran out; c2 took over
    job.do(Start("w2", claim="c2"))
    before = job.state
    assert job.do(command) == [ResultFenced("d1", "c1", state)]
    assert job.state.result_state is ResultState.STARTED
    assert (job.state.result, job.state.custom_state) == (before.result, before.custom_state)
    assert job.state.deliveries == before.deliveries


def test_a_fenced_result_is_recorded_after_success_too() -> None:
    """The history shows every run that finished, the outcome is the current claim's."""
    job = claimed(published(Job()))
    job.do(Claim("d1", "c2", "w2", LEASE), NOW + LEASE)
    job.do(Succeed({"v": "new"}, claim="c2"))
    assert job.do(Succeed({"v": "old"}, claim="c1")) == [ResultFenced("d1", "c1", "SUCCESS")]
    assert job.state.result == {"v": "new"}


def test_a_fenced_start_does_not_start_the_current_claim() -> None:
    job = claimed(published(Job()))
    job.do(Claim("d1", "c2", "w2", LEASE), NOW + LEASE)
    job.do(Start("w1", claim="c1"))
    assert not job.delivery().started


def test_a_result_under_a_claim_the_stream_does_not_know_is_recorded_as_before() -> None:
    """A claim of another stream's (a chain element's result written with its
    parent's request) names nothing here."""
    job = claimed(published(Job()))
    assert job.do(Succeed({"v": 1}, claim="elsewhere")) == [Succeeded({"v": 1})]


def test_the_first_final_outcome_stands() -> None:
    """Two deliveries of one task ran side by side: the first outcome stands, and
    nothing the other records afterwards changes it."""
    job = claimed(published(published(Job()), "d2"), "d1", "c1")
    claimed(job, "d2", "c2")
    job.do(Fail("boom", claim="c2"))
    assert job.do(Start("w1", claim="c1")) == []
    assert job.do(Succeed({"v": 1}, claim="c1")) == []
    assert job.state.result_state is ResultState.FAILURE


def test_a_second_write_of_the_same_run_after_its_outcome_changes_nothing() -> None:
    """Celery's main process records FAILURE for a pool process it lost, which may
    have recorded its own outcome first."""
    job = claimed(published(Job()))
    job.do(Fail("ValueError", claim="c1"))
    assert job.do(Fail("WorkerLostError", claim="c1")) == []
    assert job.state.result_state is ResultState.FAILURE


def test_a_run_claimed_after_the_outcome_records_its_own() -> None:
    """A task id published again after it failed (or a dead letter retried) runs
    again, and its result is the task's."""
    job = claimed(published(Job()))
    job.do(Fail("boom", claim="c1"))
    job.do(Ack("d1", "c1"))
    claimed(published(job, "d2"), "d2", "c2")
    assert job.do(Start("w", claim="c2")) == [Started("w", delivery="d2")]
    assert job.do(Succeed({"v": 1}, claim="c2")) == [Succeeded({"v": 1}, delivery="d2")]
    assert job.state.result_state is ResultState.SUCCESS


def test_results_without_a_claim_follow_each_other_as_before() -> None:
    job = claimed(published(Job()))
    job.do(Fail("boom", claim="c1"))
    assert job.do(Succeed({"v": 1})) == [Succeeded({"v": 1})]


# ---------------------------------------------------------------------------
# evolve: impossible sequences
# ---------------------------------------------------------------------------

P1 = Published("d1", "celery", MESSAGE)
C1 = Claimed("d1", "c1", "w1", NOW + LEASE)


@pytest.mark.parametrize(
    "events",
    [
        pytest.param([C1], id="claimed-unknown-delivery"),
        pytest.param([P1, Claimed("d2", "c1", "w1", NOW)], id="claimed-other-delivery"),
        pytest.param([P1, C1, Claimed("d1", "c2", "w2", NOW)], id="claimed-twice"),
        pytest.param([P1, Published("d1", "celery", MESSAGE)], id="published-twice"),
        pytest.param([P1, C1, Acked("d1", "c2")], id="acked-by-wrong-claim"),
        pytest.param([P1, Acked("d1", "c1")], id="acked-unclaimed"),
        pytest.param([Acked("d1", "c1")], id="acked-unknown-delivery"),
        pytest.param([P1, C1, Acked("d1", "c1"), Acked("d1", "c1")], id="acked-twice"),
        pytest.param([P1, C1, LeaseRenewed("d1", "c2", NOW)], id="renewed-by-wrong-claim"),
        pytest.param([P1, C1, Requeued("d1", "c2", "rejected")], id="requeued-by-wrong-claim"),
        pytest.param([P1, Requeued("d1", "c1", "restored")], id="requeued-unclaimed"),
        pytest.param([P1, C1, LeaseExpired("d1", "c2")], id="lease-expired-wrong-claim"),
        pytest.param([P1, LeaseExpired("d1", "c1")], id="lease-expired-unclaimed"),
        pytest.param([P1, C1, Discarded("d1", "purged")], id="claimed-discarded"),
        pytest.param([Discarded("d1", "purged")], id="discarded-unknown"),
        pytest.param([DeadLettered("d1", "x")], id="dead-lettered-unknown"),
        pytest.param(
            [P1, Discarded("d1", "purged"), Discarded("d1", "purged")], id="discarded-twice"
        ),
        pytest.param([P1, Discarded("d1", "x"), DeadLettered("d1", "x")], id="dead-after-final"),
        pytest.param([P1, C1, Acked("d1", "c1"), Claimed("d1", "c2", "w", NOW)], id="claim-acked"),
        pytest.param([P1, DeadLettered("d1", "x"), C1], id="claim-dead"),
        pytest.param([Succeeded(), Started("w1")], id="started-after-success"),
        pytest.param([Succeeded(), RetryScheduled("r")], id="retry-after-success"),
        pytest.param([Succeeded(), Succeeded()], id="success-after-success"),
        pytest.param([Succeeded(), Failed("boom")], id="failed-after-success"),
        pytest.param([object()], id="not-an-event"),
    ],
)
def test_evolve_rejects_impossible_sequences(events: list[Any]) -> None:
    *valid, impossible = events
    state = fold_all(valid)  # the prefix is fine
    with pytest.raises(CorruptStream):
        evolve(state, impossible)
    with pytest.raises(CorruptStream):
        fold_all(events)


def test_corrupt_stream_is_not_an_invalid_transition() -> None:
    # A corrupt log is a different failure from a refused command.
    assert issubclass(CorruptStream, EventStoreError)
    assert not issubclass(CorruptStream, InvalidTransition)
    assert issubclass(StaleClaim, InvalidTransition)
    assert issubclass(NotClaimable, InvalidTransition)
    assert issubclass(UnknownDelivery, InvalidTransition)


def test_evolve_counts_versions_and_does_not_mutate() -> None:
    state = JobState(stream=STREAM)
    s1 = evolve(state, P1)
    s2 = evolve(s1, C1)
    assert (state.version, s1.version, s2.version) == (0, 1, 2)
    assert state.deliveries == {}
    assert s1.delivery("d1").status is DeliveryStatus.READY
    assert s2.delivery("d1").status is DeliveryStatus.CLAIMED


def test_revoked_event_after_success_is_kept_as_success() -> None:
    state = fold_all([Succeeded({"v": 1}), Revoked()])
    assert state.revoked
    assert state.result_state is ResultState.SUCCESS


def test_unknown_delivery_lookup() -> None:
    with pytest.raises(UnknownDelivery):
        JobState(stream=STREAM).delivery("d1")


# ---------------------------------------------------------------------------
# event_from / event_data
# ---------------------------------------------------------------------------

# Events of the job lifecycle proper, constructed directly.
LIFECYCLE_EVENTS: list[Event] = [
    Published("d1", "celery", MESSAGE, priority=3, not_before=NOW + 1.5, expires=NOW + 60),
    Published("d2", "q", {}),
    Claimed("d1", "c1", "w1", NOW + LEASE),
    LeaseRenewed("d1", "c1", NOW + 2 * LEASE),
    Acked("d1", "c1"),
    Requeued("d1", "c1", "rejected", NOW + 10.25),
    Requeued("d1", "c1", "restored"),
    Requeued("d1", "c1", "rejected and requeued", lost=True),
    LeaseExpired("d1", "c1"),
    DeadLettered("d1", "claimed 3 times"),
    Discarded("d1", "expired"),
    Revoked(),
    Revoked("terminated"),
    Started(),
    Started("w1", {"pid": 1}),
    RetryScheduled("Retry(in 5s)", 5.0, {"exc": "x"}),
    RetryScheduled("Retry"),
    Succeeded(),
    Succeeded({"result": [1, 2, 3]}),
    Succeeded({"result": 4}, delivery="d1"),
    Started("w1", delivery="d1"),
    RetryScheduled("Retry", delivery="d1"),
    Failed("ValueError('x')", "Traceback (most recent call last): ...", {"exc": "x"}),
    Failed("boom"),
    Failed("boom", delivery="d1"),
]

# Other event types (results, groups, chords), built by name from EVENT_TYPES so this
# module does not depend on their classes; a type not (yet) in the model is skipped.
OTHER_EVENT_SAMPLES: list[tuple[str, dict[str, Any]]] = [
    ("DeadLetterPurged", {"delivery": "d1"}),
    ("Forgotten", {}),
    ("ResultExpired", {}),
    ("GroupSaved", {"result": {"results": [["t1", None], ["t2", None]]}}),
    ("GroupDeleted", {}),
    ("ChordPartDone", {"task_id": "t1", "state": "SUCCESS"}),
    ("ChordCompleted", {"size": 3}),
    ("StateUpdated", {"state": "PROGRESS", "result": {"done": 1}}),
    ("Quarantined", {"delivery": "d1", "queue": "q", "reason": "unreadable event"}),
    ("ResultFenced", {"delivery": "d1", "claim": "c1", "state": "SUCCESS"}),
    ("StateUpdated", {"state": "PROGRESS", "result": None, "delivery": "d1"}),
]

ALL_EVENTS: list[Event] = LIFECYCLE_EVENTS + [
    EVENT_TYPES[name](**fields) for name, fields in OTHER_EVENT_SAMPLES if name in EVENT_TYPES
]


def test_every_event_type_is_covered() -> None:
    """A new event type needs a sample here, so that its round trip is tested."""
    assert set(EVENT_TYPES) <= {event_type(e) for e in ALL_EVENTS}
    for name, cls in EVENT_TYPES.items():
        assert cls.__name__ == name


@pytest.mark.parametrize("event", ALL_EVENTS, ids=lambda e: event_type(e))
def test_event_data_round_trip(event: Event) -> None:
    name = event_type(event)
    data = event_data(event)
    assert name == type(event).__name__
    assert isinstance(data, dict)
    assert event_from(name, data) == event
    # Through JSON, as it is stored.
    stored_name, stored_data = json.loads(json.dumps([name, data]))
    rebuilt = event_from(stored_name, stored_data)
    assert rebuilt == event
    assert type(rebuilt) is type(event)


def test_event_data_holds_every_field_by_name() -> None:
    assert event_data(Claimed("d1", "c1", "w1", 12.5)) == {
        "delivery": "d1",
        "claim": "c1",
        "consumer": "w1",
        "lease_until": 12.5,
    }
    assert event_data(Revoked())["reason"] == "revoked"
    assert event_data(Acked("d1", "c1")) == {"delivery": "d1", "claim": "c1"}
    assert event_data(Requeued("d", "c", "restored")) == {
        "delivery": "d",
        "claim": "c",
        "reason": "restored",
        "not_before": None,
        "lost": False,
    }


def test_event_from_fills_defaults() -> None:
    assert event_from("Published", {"delivery": "d", "queue": "q", "message": {}}) == Published(
        "d", "q", {}, 0, None, None
    )
    assert event_from("Revoked", {}) == Revoked("revoked")


def test_a_stream_round_trips_through_storage() -> None:
    job = claimed(published(Job()))
    job.do(Renew("d1", "c1", LEASE), NOW + 10)
    job.do(Claim("d1", "c2", "w2", LEASE), NOW + 100)
    job.do(Start("w2"))
    job.do(Reject("d1", "c2", requeue=True, countdown=3.0), NOW + 101)
    job.do(Revoke())
    job.do(Succeed({"v": 1}))
    stored = json.loads(json.dumps([[event_type(e), event_data(e)] for e in job.events]))
    assert fold_all(event_from(name, data) for name, data in stored) == job.state


@pytest.mark.parametrize(
    "type_name",
    ["Nope", "", "published", "Event", "JobState", "Delivery", "Publish", "Claim", "__class__"],
)
def test_event_from_unknown_type_raises_corrupt_stream(type_name: str) -> None:
    with pytest.raises(CorruptStream):
        event_from(type_name, {})


@pytest.mark.parametrize(
    ("type_name", "data"),
    [
        pytest.param("Claimed", {"delivery": "d1", "claim": "c1"}, id="missing-fields"),
        pytest.param("Acked", {}, id="no-fields"),
        pytest.param("Acked", {"delivery": "d1", "claim": "c1", "extra": 1}, id="unknown-field"),
        pytest.param("Revoked", {"why": "x"}, id="unknown-field-only"),
        pytest.param("Failed", {"traceback": "tb"}, id="missing-required"),
        pytest.param("Acked", None, id="not-a-mapping"),
        pytest.param("Acked", ["d1", "c1"], id="a-list"),
        pytest.param("Acked", {1: "d1"}, id="non-string-key"),
    ],
)
def test_event_from_bad_fields_raises_corrupt_stream(type_name: str, data: Any) -> None:
    with pytest.raises(CorruptStream) as info:
        event_from(type_name, data)
    assert type_name in str(info.value)


def test_a_quarantined_delivery_is_dead_and_an_unknown_one_is_ignored() -> None:
    from celery_eventstore.lifecycle import Published, Quarantined

    state = fold("t", [Published("d1", "q", {})])
    dead = evolve(state, Quarantined("d1", "q", "unreadable event at position 7"))
    assert dead.delivery("d1").status.value == "dead"
    assert dead.delivery("d1").reason == "unreadable event at position 7"
    assert dead.result_state.value == "FAILURE"  # nothing will run it: waiters stop
    # Its Published was the unreadable row: the stream cannot name the delivery.
    assert evolve(state, Quarantined("d9", "q", "gone")).deliveries == state.deliveries


def test_the_unreadable_stand_in_is_never_stored() -> None:
    from celery_eventstore.lifecycle import Unreadable

    assert "Unreadable" not in EVENT_TYPES
    with pytest.raises(CorruptStream):
        evolve(fold("t", []), Unreadable("Bogus", "unknown event type"))
