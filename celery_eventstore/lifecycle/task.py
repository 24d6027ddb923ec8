"""Task streams (any stream id without a ``group:``/``chord:`` prefix) fold to
:class:`TaskState`.

A task stream holds every delivery of one Celery task -- the first publish, each
``retry()`` re-publish, each requeue (see :mod:`.delivery` for who moves a
delivery between its states) -- and the task's result states (``STARTED``,
``RETRY``, ``SUCCESS``, ``FAILURE``, ``REVOKED``), which the worker running it
records.  Once ``SUCCESS`` is recorded later result writes are ignored, as with
Celery's own backends.  Since both live in one stream, a delivery whose task's
final outcome was recorded since its claim is settled rather than run again.
Below: one function per event it folds, then one per command it decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..exceptions import CorruptStream, InvalidTransition, NotClaimable, StaleClaim, UnknownDelivery
from .commands import (
    Ack,
    Claim,
    Discard,
    ExpireResult,
    Fail,
    Forget,
    Publish,
    PurgeDeadLetter,
    Reject,
    Renew,
    Restore,
    Revoke,
    ScheduleRetry,
    Start,
    Succeed,
    UpdateState,
)
from .delivery import Delivery, DeliveryStatus
from .events import (
    JSON,
    Acked,
    Claimed,
    DeadLettered,
    DeadLetterPurged,
    Discarded,
    Event,
    Failed,
    Forgotten,
    LeaseExpired,
    LeaseRenewed,
    Published,
    Quarantined,
    Requeued,
    ResultExpired,
    ResultFenced,
    RetryScheduled,
    Revoked,
    Started,
    StateUpdated,
    Succeeded,
    event_type,
)
from .streams import JobState, ResultState, Rules, StreamKind, replace

rules = Rules(StreamKind.TASK)

#: A delivery is dead-lettered after ``max_claims`` lost runs, or after this many
#: times ``max_claims`` leases lost before its task started: a message prefetched
#: beside a task that kills its worker loses its lease with it, and must not pay
#: for it; yet a task that kills its worker before anything is recorded stops too.
UNSTARTED_CLAIMS_FACTOR = 3

#: Why a delivery claimed before is settled once its task's final outcome is recorded.
OUTCOME_RECORDED = "outcome recorded"


@dataclass(frozen=True)
class TaskState(JobState, rules=rules):
    """A task stream folded: its deliveries and its result state."""

    deliveries: Mapping[str, Delivery] = field(default_factory=dict)
    result_state: ResultState = ResultState.PENDING
    result: JSON | None = None
    revoked: bool = False
    forgotten: bool = False
    #: A state of the task's own making (``update_state``); None for Celery's states.
    custom_state: str | None = None
    #: The stream version of the last final outcome recorded (``Succeeded`` or
    #: ``Failed``; not the ``FAILURE`` a dead letter implies); 0 while none is.
    outcome_version: int = 0

    def delivery(self, delivery_id: str) -> Delivery:
        try:
            return self.deliveries[delivery_id]
        except KeyError:
            raise UnknownDelivery(
                f"stream {self.stream!r} has no delivery {delivery_id!r}"
            ) from None

    def pending(self) -> list[Delivery]:
        """Deliveries that are not settled yet (ready, scheduled or claimed)."""
        return [d for d in self.deliveries.values() if not d.status.is_final]


_UNFINISHED = (ResultState.PENDING, ResultState.STARTED, ResultState.RETRY)
_FINAL = (ResultState.SUCCESS, ResultState.FAILURE, ResultState.REVOKED)


def _running(state: TaskState) -> bool:
    """A worker has reported the task started (or a custom state such as PROGRESS)."""
    return state.result_state is ResultState.STARTED or (
        state.custom_state is not None and state.result_state in _UNFINISHED
    )


# -- evolve: one function per event -------------------------------------------------


def _with_delivery(state: TaskState, delivery: Delivery, **changes: object) -> TaskState:
    deliveries = dict(state.deliveries)
    deliveries[delivery.id] = replace(delivery, **changes)
    return replace(state, deliveries=deliveries)


def _known(state: TaskState, event: Event, delivery_id: str) -> Delivery:
    delivery = state.deliveries.get(delivery_id)
    if delivery is None:
        raise CorruptStream(
            f"{event_type(event)} for unknown delivery {delivery_id!r} "
            f"in stream {state.stream!r}"
        )
    return delivery


def _pending(state: TaskState, event: Event, delivery_id: str) -> Delivery:
    delivery = _known(state, event, delivery_id)
    if delivery.status.is_final:
        raise CorruptStream(
            f"{event_type(event)} for delivery {delivery_id!r}, "
            f"already {delivery.status.value}"
        )
    return delivery


def _claimed_by(state: TaskState, event: Event, delivery_id: str, claim: str) -> Delivery:
    delivery = _known(state, event, delivery_id)
    if delivery.status is not DeliveryStatus.CLAIMED or delivery.claim != claim:
        raise CorruptStream(
            f"{event_type(event)} for claim {claim!r} of delivery {delivery_id!r}, "
            f"which is {delivery.status.value} under claim {delivery.claim!r}"
        )
    return delivery


@rules.evolves(Published)
def _published(state: TaskState, event: Published) -> TaskState:
    if event.delivery in state.deliveries:
        raise CorruptStream(f"delivery {event.delivery!r} published twice")
    deliveries = dict(state.deliveries)
    deliveries[event.delivery] = Delivery(
        id=event.delivery,
        queue=event.queue,
        priority=event.priority,
        not_before=event.not_before,
        expires=event.expires,
    )
    return replace(state, deliveries=deliveries)


@rules.evolves(Claimed)
def _claimed(state: TaskState, event: Claimed) -> TaskState:
    delivery = _pending(state, event, event.delivery)
    if delivery.status is DeliveryStatus.CLAIMED:
        raise CorruptStream(f"delivery {event.delivery!r} claimed twice")
    return _with_delivery(
        state,
        delivery,
        status=DeliveryStatus.CLAIMED,
        claim=event.claim,
        consumer=event.consumer,
        lease_until=event.lease_until,
        claim_ids=(*delivery.claim_ids, event.claim),
        claimed_version=state.version + 1,
        started=False,
    )


@rules.evolves(LeaseRenewed)
def _lease_renewed(state: TaskState, event: LeaseRenewed) -> TaskState:
    delivery = _claimed_by(state, event, event.delivery, event.claim)
    return _with_delivery(state, delivery, lease_until=event.lease_until)


@rules.evolves(Acked)
def _acked(state: TaskState, event: Acked) -> TaskState:
    delivery = _claimed_by(state, event, event.delivery, event.claim)
    return _with_delivery(state, delivery, status=DeliveryStatus.ACKED, lease_until=None)


@rules.evolves(Requeued)
def _requeued(state: TaskState, event: Requeued) -> TaskState:
    delivery = _claimed_by(state, event, event.delivery, event.claim)
    return _with_delivery(
        state,
        delivery,
        status=DeliveryStatus.READY,
        claim=None,
        consumer=None,
        lease_until=None,
        not_before=event.not_before if event.not_before is not None else delivery.not_before,
        reason=event.reason,
        started=False,
        lost_claims=delivery.lost_claims + event.lost,
    )


@rules.evolves(LeaseExpired)
def _lease_expired(state: TaskState, event: LeaseExpired) -> TaskState:
    delivery = _claimed_by(state, event, event.delivery, event.claim)
    return _with_delivery(
        state,
        delivery,
        status=DeliveryStatus.READY,
        claim=None,
        consumer=None,
        lease_until=None,
        started=False,
        lost_claims=delivery.lost_claims + event.started,
        lost_unstarted=delivery.lost_unstarted + (not event.started),
        reason="lease expired",
    )


@rules.evolves(DeadLettered)
def _dead_lettered(state: TaskState, event: DeadLettered) -> TaskState:
    delivery = _pending(state, event, event.delivery)
    state = _with_delivery(
        state, delivery, status=DeliveryStatus.DEAD, lease_until=None, reason=event.reason
    )
    if state.result_state in _UNFINISHED and not state.pending():
        # Nothing will run it again: a waiter must not wait forever.
        state = replace(state, result_state=ResultState.FAILURE, result=None, custom_state=None)
    return state


@rules.evolves(Quarantined)
def _quarantined(state: TaskState, event: Quarantined) -> TaskState:
    # Only written on a stream that could not be read: if it can be read again
    # (an operator repaired the row), a delivery it names may be unknown or settled.
    delivery = state.deliveries.get(event.delivery)
    if delivery is None or delivery.status.is_final:
        return state
    return _dead_lettered(state, DeadLettered(event.delivery, event.reason))


@rules.evolves(DeadLetterPurged)
def _dead_letter_purged(state: TaskState, event: DeadLetterPurged) -> TaskState:
    delivery = _known(state, event, event.delivery)
    if delivery.status is not DeliveryStatus.DEAD:
        raise CorruptStream(f"purged delivery {event.delivery!r} is {delivery.status.value}")
    return state


@rules.evolves(Discarded)
def _discarded(state: TaskState, event: Discarded) -> TaskState:
    delivery = _pending(state, event, event.delivery)
    if delivery.status is DeliveryStatus.CLAIMED:
        raise CorruptStream(f"claimed delivery {event.delivery!r} discarded")
    state = _with_delivery(state, delivery, status=DeliveryStatus.DISCARDED, reason=event.reason)
    if event.reason == "expired" and state.result_state is ResultState.PENDING:
        # Celery reports a task that expired unrun as REVOKED.
        state = replace(state, result_state=ResultState.REVOKED)
    elif event.reason == "revoked" and _running(state) and not state.pending():
        # The run that kept its state through the revoke was lost (its lease
        # ran out) and will not run again: a waiter must not wait forever.
        state = replace(state, result_state=ResultState.REVOKED, result=None, custom_state=None)
    return state


@rules.evolves(Revoked)
def _revoked(state: TaskState, event: Revoked) -> TaskState:
    if state.result_state is ResultState.SUCCESS or _running(state):
        # A revoke does not stop a running task (Celery's terminate does): its
        # state stays the running worker's to report, as with Celery's own
        # backends.  Only its later deliveries are discarded.
        return replace(state, revoked=True)
    return replace(
        state, revoked=True, result_state=ResultState.REVOKED, result=event.result,
        custom_state=None,
    )


@rules.evolves(Forgotten, ResultExpired)
def _forgotten(state: TaskState, event: Forgotten | ResultExpired) -> TaskState:
    # The result is gone for the backend; the history (and this state) stays.
    return replace(state, forgotten=True)


def _result(
    state: TaskState, event: Event, new: ResultState, result: JSON | None, delivery: str | None
) -> TaskState:
    if state.result_state is ResultState.SUCCESS:
        raise CorruptStream(f"{new.value} recorded after SUCCESS in {state.stream!r}")
    state = _run_seen(state, event, delivery)
    return replace(state, result_state=new, result=result, forgotten=False, custom_state=None)


def _run_seen(state: TaskState, event: Event, delivery_id: str | None) -> TaskState:
    """A result event shows that the task started under the claim it follows: that
    of the delivery it names; one that names none (written before results named
    their delivery) stands for every claimed delivery of the stream."""
    if delivery_id is not None:
        seen = [_known(state, event, delivery_id)]
    else:
        seen = list(state.deliveries.values())
    for d in seen:
        if d.status is DeliveryStatus.CLAIMED and not d.started:
            state = _with_delivery(state, d, started=True)
    return state


@rules.evolves(StateUpdated)
def _state_updated(state: TaskState, event: StateUpdated) -> TaskState:
    state = _result(state, event, ResultState.STARTED, event.result, event.delivery)
    return replace(state, custom_state=event.state)


@rules.evolves(Started)
def _started(state: TaskState, event: Started) -> TaskState:
    return _result(state, event, ResultState.STARTED, event.result, event.delivery)


@rules.evolves(RetryScheduled)
def _retry_scheduled(state: TaskState, event: RetryScheduled) -> TaskState:
    return _result(state, event, ResultState.RETRY, event.result, event.delivery)


@rules.evolves(Succeeded)
def _succeeded(state: TaskState, event: Succeeded) -> TaskState:
    state = _result(state, event, ResultState.SUCCESS, event.result, event.delivery)
    return replace(state, outcome_version=state.version + 1)


@rules.evolves(Failed)
def _failed(state: TaskState, event: Failed) -> TaskState:
    state = _result(state, event, ResultState.FAILURE, event.result, event.delivery)
    return replace(state, outcome_version=state.version + 1)


@rules.evolves(ResultFenced)
def _result_fenced(state: TaskState, event: ResultFenced) -> TaskState:
    _known(state, event, event.delivery)
    return state  # history only


# -- decide: one function per command -----------------------------------------------


@rules.decides(Publish)
def _publish(command: Publish, state: TaskState, now: float) -> list[Event]:
    published = Published(
        delivery=command.delivery,
        queue=command.queue,
        message=command.message,
        priority=command.priority,
        not_before=command.not_before,
        expires=command.expires,
        retry_of=command.retry_of,
    )
    if command.retry_of is not None and (
        state.deliveries.get(command.retry_of) is None
        or state.deliveries[command.retry_of].status is not DeliveryStatus.DEAD
    ):
        raise InvalidTransition(f"delivery {command.retry_of!r} is not dead-lettered")
    held = state.deliveries.get(command.delivery)
    if held is not None:
        if held.queue != command.queue:
            raise InvalidTransition(
                f"delivery {command.delivery!r} already published to {held.queue!r}"
            )
        # The same publish again: its producer retried a commit whose answer it
        # never heard.  The first one counts; the delivery is not doubled.
        return []
    if state.revoked:
        return [published, Discarded(command.delivery, "revoked")]
    return [published]


@rules.decides(Claim)
def _claim(command: Claim, state: TaskState, now: float) -> list[Event]:
    delivery = state.delivery(command.delivery)
    events: list[Event] = []
    if delivery.status is DeliveryStatus.CLAIMED:
        if not delivery.lease_expired(now):
            raise NotClaimable(f"delivery {delivery.id!r} is claimed until its lease ends")
        assert delivery.claim is not None
        expired = LeaseExpired(delivery.id, delivery.claim, started=delivery.started)
        events.append(expired)
        state = _lease_expired(state, expired)
        delivery = state.deliveries[delivery.id]
    elif delivery.status.is_final:
        raise NotClaimable(f"delivery {delivery.id!r} is {delivery.status.value}")
    if not delivery.is_due(now):
        raise NotClaimable(f"delivery {delivery.id!r} is scheduled for later")
    events.append(_claim_outcome(command, state, delivery, now))
    return events


def _claim_outcome(command: Claim, state: TaskState, delivery: Delivery, now: float) -> Event:
    """What a claim of a claimable (ready, due) delivery comes to."""
    if state.revoked:
        # Claimed before the revoke, then given back: it must not run now.
        return Discarded(delivery.id, "revoked")
    if _finished(state, delivery):
        return Discarded(delivery.id, OUTCOME_RECORDED)
    spent = _budget_spent(delivery, command.max_claims)
    if spent is not None:
        return DeadLettered(delivery.id, spent)
    if delivery.is_expired(now):
        return Discarded(delivery.id, "expired")
    return Claimed(delivery.id, command.claim, command.consumer, now + command.lease_seconds)


def _budget_spent(delivery: Delivery, max_claims: int | None) -> str | None:
    """Why ``delivery`` must not be claimed again, if its claim budget is spent."""
    if max_claims is None:
        return None
    if delivery.lost_claims >= max_claims:
        runs = _times(delivery.lost_claims, "run")
        return f"{runs} ended without an outcome (lease expired or requeued)"
    if delivery.lost_unstarted >= UNSTARTED_CLAIMS_FACTOR * max_claims:
        return f"lost its lease {_times(delivery.lost_unstarted, 'time')} before it started"
    return None


def _times(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _current_claim(state: TaskState, delivery_id: str, claim: str) -> Delivery:
    delivery = state.deliveries.get(delivery_id)
    if delivery is None:
        raise StaleClaim(f"no delivery {delivery_id!r} in stream {state.stream!r}")
    if delivery.status is not DeliveryStatus.CLAIMED or delivery.claim != claim:
        raise StaleClaim(
            f"claim {claim!r} of delivery {delivery_id!r} is not current "
            f"(delivery is {delivery.status.value}"
            + (f", claimed as {delivery.claim!r})" if delivery.claim else ")")
        )
    return delivery


def _finished(state: TaskState, delivery: Delivery) -> bool:
    """Whether the task's final outcome was recorded since ``delivery`` was last
    claimed: by that run (its worker died before the ack), or by another delivery
    of the task running beside it.  Running it again would repeat a finished task.
    A delivery never claimed (a fresh publish of the task id) is not finished."""
    return delivery.claims > 0 and state.outcome_version > delivery.claimed_version


def _unless_settled(state: TaskState, delivery: Delivery, requeued: Requeued) -> list[Event]:
    """A delivery given back after its task was revoked, or with its task's outcome
    recorded since its claim, is discarded, not re-run."""
    if state.revoked:
        return [requeued, Discarded(requeued.delivery, "revoked")]
    if _finished(state, delivery):
        return [requeued, Discarded(requeued.delivery, OUTCOME_RECORDED)]
    return [requeued]


@rules.decides(Renew)
def _renew(command: Renew, state: TaskState, now: float) -> list[Event]:
    _current_claim(state, command.delivery, command.claim)
    return [LeaseRenewed(command.delivery, command.claim, now + command.lease_seconds)]


@rules.decides(Ack)
def _ack(command: Ack, state: TaskState, now: float) -> list[Event]:
    _current_claim(state, command.delivery, command.claim)
    return [Acked(command.delivery, command.claim)]


@rules.decides(Reject)
def _reject(command: Reject, state: TaskState, now: float) -> list[Event]:
    delivery = _current_claim(state, command.delivery, command.claim)
    if command.requeue:
        # Celery requeues a message whose task's pool process died
        # (reject_on_worker_lost) or timed out: a run that ended without an
        # outcome, which counts towards max_claims like a lost lease.
        not_before = now + command.countdown if command.countdown else None
        requeued = Requeued(command.delivery, command.claim, command.reason, not_before, lost=True)
        return _unless_settled(state, delivery, requeued)
    return [DeadLettered(command.delivery, command.reason)]


@rules.decides(Restore)
def _restore(command: Restore, state: TaskState, now: float) -> list[Event]:
    delivery = _current_claim(state, command.delivery, command.claim)
    # Given back unstarted (prefetched), it cost nothing; a started task that is
    # given back (a cold shutdown) is a run lost like any other.
    restored = Requeued(command.delivery, command.claim, "restored", lost=delivery.started)
    return _unless_settled(state, delivery, restored)


@rules.decides(Discard)
def _discard(command: Discard, state: TaskState, now: float) -> list[Event]:
    delivery = state.delivery(command.delivery)
    if delivery.status.is_final:
        return []
    if delivery.status is DeliveryStatus.CLAIMED:
        raise InvalidTransition(f"delivery {delivery.id!r} is claimed; it cannot be discarded")
    return [Discarded(delivery.id, command.reason)]


@rules.decides(PurgeDeadLetter)
def _purge_dead_letter(command: PurgeDeadLetter, state: TaskState, now: float) -> list[Event]:
    delivery = state.delivery(command.delivery)
    if delivery.status is not DeliveryStatus.DEAD:
        raise InvalidTransition(f"delivery {delivery.id!r} is not dead-lettered")
    return [DeadLetterPurged(delivery.id)]


@rules.decides(Revoke)
def _revoke(command: Revoke, state: TaskState, now: float) -> list[Event]:
    if state.revoked:
        return []
    unclaimed = [d for d in state.pending() if d.status is not DeliveryStatus.CLAIMED]
    return [Revoked(command.reason, command.result)] + [
        Discarded(d.id, "revoked") for d in unclaimed
    ]


@rules.decides(Forget)
def _forget(command: Forget, state: TaskState, now: float) -> list[Event]:
    return [] if state.forgotten else [Forgotten()]


@rules.decides(ExpireResult)
def _expire_result(command: ExpireResult, state: TaskState, now: float) -> list[Event]:
    if state.forgotten or state.result_state not in _FINAL:
        return []
    return [ResultExpired()]


# Result states.  One written from elsewhere (no claim) is recorded unless SUCCESS
# is, as in Celery.  One from a worker names the claim its message was delivered
# under: fenced out if another claim of that delivery took over; else recorded,
# naming the delivery, unless the task's final outcome is already recorded since
# that claim (the first final outcome stands).


#: The result writes a worker makes under its claim.  Each is decided by the
#: claim it names and the stream's result state alone, never by the clock: a
#: writer may decide one on the state its claim left, before it knows the time
#: its events will be recorded at.
CLOCKLESS_RESULT_WRITES = (Start, ScheduleRetry, Succeed, Fail, UpdateState)

#: Events that change neither how a result write is decided (the claims each
#: delivery had, the result state, the last outcome) nor the result or state
#: it leaves: a write decided before them is decided as after them.  A worker's
#: early ack and its lease renewals land between its claim and its result.
RESULT_NEUTRAL_EVENTS = (Acked, LeaseRenewed)


@rules.decides(Start)
def _start(command: Start, state: TaskState, now: float) -> list[Event]:
    started = Started(command.worker, command.result)
    return _result_write(state, command.claim, ResultState.STARTED.value, started)


@rules.decides(ScheduleRetry)
def _schedule_retry(command: ScheduleRetry, state: TaskState, now: float) -> list[Event]:
    retry = RetryScheduled(command.exc, command.countdown, command.result)
    return _result_write(state, command.claim, ResultState.RETRY.value, retry)


@rules.decides(Succeed)
def _succeed(command: Succeed, state: TaskState, now: float) -> list[Event]:
    succeeded = Succeeded(command.result)
    return _result_write(state, command.claim, ResultState.SUCCESS.value, succeeded)


@rules.decides(Fail)
def _fail(command: Fail, state: TaskState, now: float) -> list[Event]:
    failed = Failed(command.exc, command.traceback, command.result)
    return _result_write(state, command.claim, ResultState.FAILURE.value, failed)


@rules.decides(UpdateState)
def _update_state(command: UpdateState, state: TaskState, now: float) -> list[Event]:
    updated = StateUpdated(command.state, command.result)
    return _result_write(state, command.claim, command.state, updated)


def _result_write(
    state: TaskState, claim: str | None, result_state: str, event: Event
) -> list[Event]:
    """The events a result write comes to, by the claim it came from."""
    delivery = _claimed_as(state, claim)
    if delivery is None:  # written from elsewhere, or under a claim of another stream's
        return [] if state.result_state is ResultState.SUCCESS else [event]
    assert claim is not None
    if delivery.claim_ids[-1] != claim:
        return [ResultFenced(delivery.id, claim, result_state)]
    if state.result_state is ResultState.SUCCESS or _finished(state, delivery):
        return []
    return [replace(event, delivery=delivery.id)]


def _claimed_as(state: TaskState, claim: str | None) -> Delivery | None:
    """The delivery that had claim ``claim``, if any of this stream's did."""
    if claim is None:
        return None
    return next((d for d in state.deliveries.values() if claim in d.claim_ids), None)
