"""The job lifecycle: events, state, commands and the decisions between them.

This module is pure: no I/O, no clock of its own.  Time comes in as ``now``
(seconds since the epoch, float), so every rule here is testable without a
database and without sleeping, and every storage dialect shares it.

A **stream** is one Celery task (its ``task_id``).  It holds every *delivery*
of that task -- the first publish, each ``retry()`` re-publish, each requeue --
and the task's result states.  One delivery moves through::

    published --> ready (or scheduled until not_before)
    ready     --> claimed                       Claim
    claimed   --> claimed                       Renew (lease extended)
    claimed   --> acked                         Ack
    claimed   --> ready                         Reject(requeue=True), Restore
    claimed   --> dead                          Reject(requeue=False)
    claimed   --> ready (lease expired)         a new Claim finds the lease run out
    ready     --> dead                          a Claim finds ``max_claims`` leases lost
    ready     --> discarded                     expired, revoked, purged

``acked``, ``dead`` and ``discarded`` are final.  The result states of the task
(``STARTED``, ``RETRY``, ``SUCCESS``, ``FAILURE``, ``REVOKED``) live beside the
deliveries; once ``SUCCESS`` is recorded, later result writes are ignored, as
with Celery's own backends.

:func:`decide` turns a command into events (or raises
:class:`~celery_eventstore.exceptions.InvalidTransition`); :func:`evolve`
folds one event into the state; :func:`fold` folds a whole stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

from ..exceptions import (
    CorruptStream,
    InvalidTransition,
    NotClaimable,
    StaleClaim,
    UnknownDelivery,
)
from .commands import (
    Ack,
    Claim,
    Command,
    CountChordPart,
    DeleteGroup,
    Discard,
    Fail,
    Forget,
    Publish,
    PurgeDeadLetter,
    Reject,
    Renew,
    Restore,
    Revoke,
    SaveGroup,
    ScheduleRetry,
    Start,
    Succeed,
    UpdateState,
)
from .events import (
    JSON,
    Acked,
    ChordCompleted,
    ChordPartDone,
    Claimed,
    DeadLettered,
    DeadLetterPurged,
    Discarded,
    Event,
    Failed,
    Forgotten,
    GroupDeleted,
    GroupSaved,
    LeaseExpired,
    LeaseRenewed,
    Published,
    Requeued,
    RetryScheduled,
    Revoked,
    Started,
    StateUpdated,
    Succeeded,
    event_type,
)

# ---------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------


class DeliveryStatus(str, Enum):
    READY = "ready"  # waiting; "scheduled" while now < not_before
    CLAIMED = "claimed"
    ACKED = "acked"
    DEAD = "dead"
    DISCARDED = "discarded"

    @property
    def is_final(self) -> bool:
        return self in (DeliveryStatus.ACKED, DeliveryStatus.DEAD, DeliveryStatus.DISCARDED)


@dataclass(frozen=True)
class Delivery:
    """One published message of a task, as far as the log tells."""

    id: str
    queue: str
    priority: int
    not_before: float | None
    expires: float | None
    status: DeliveryStatus = DeliveryStatus.READY
    claim: str | None = None
    consumer: str | None = None
    lease_until: float | None = None
    claims: int = 0  # every Claimed
    lost_claims: int = 0  # claims whose lease ran out without an outcome
    reason: str | None = None  # why it was requeued, dead-lettered or discarded

    @property
    def redelivered(self) -> bool:
        """True when a claim before the current (or next) one ended without an ack."""
        earlier = self.claims - 1 if self.status is DeliveryStatus.CLAIMED else self.claims
        return earlier > 0

    def is_due(self, now: float) -> bool:
        return self.not_before is None or self.not_before <= now

    def is_expired(self, now: float) -> bool:
        return self.expires is not None and self.expires <= now

    def lease_expired(self, now: float) -> bool:
        return (
            self.status is DeliveryStatus.CLAIMED
            and self.lease_until is not None
            and self.lease_until <= now
        )


class ResultState(str, Enum):
    """Celery's state names, so the backend can hand them over unchanged."""

    PENDING = "PENDING"
    STARTED = "STARTED"
    RETRY = "RETRY"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    REVOKED = "REVOKED"


@dataclass(frozen=True)
class JobState:
    """A stream folded: its version, its deliveries and its result state."""

    stream: str
    version: int = 0
    deliveries: Mapping[str, Delivery] = field(default_factory=dict)
    result_state: ResultState = ResultState.PENDING
    result: JSON | None = None
    revoked: bool = False
    forgotten: bool = False
    #: A state of the task's own making (``update_state``); None for Celery's states.
    custom_state: str | None = None
    #: Header tasks of a chord that finished (chord streams only).
    chord_parts: frozenset[str] = frozenset()
    chord_completed: bool = False

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


# ---------------------------------------------------------------------------
# evolve: state + event -> state
# ---------------------------------------------------------------------------


_T = TypeVar("_T")


def _replace(obj: _T, **changes: Any) -> _T:
    """:func:`dataclasses.replace` without re-running ``__init__`` (the states have
    no ``__post_init__``): folding streams is the hot path of every claim."""
    unknown = changes.keys() - obj.__dataclass_fields__.keys()  # type: ignore[attr-defined]
    if unknown:
        raise TypeError(f"{type(obj).__name__} has no field(s) {sorted(unknown)}")
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__, **changes)
    return new


def _with_delivery(state: JobState, delivery: Delivery, **changes: Any) -> JobState:
    deliveries = dict(state.deliveries)
    deliveries[delivery.id] = _replace(delivery, **changes)
    return _replace(state, deliveries=deliveries)


def _claimed_by(state: JobState, event: Event, delivery_id: str, claim: str) -> Delivery:
    delivery = _known(state, event, delivery_id)
    if delivery.status is not DeliveryStatus.CLAIMED or delivery.claim != claim:
        raise CorruptStream(
            f"{event_type(event)} for claim {claim!r} of delivery {delivery_id!r}, "
            f"which is {delivery.status.value} under claim {delivery.claim!r}"
        )
    return delivery


def _known(state: JobState, event: Event, delivery_id: str) -> Delivery:
    delivery = state.deliveries.get(delivery_id)
    if delivery is None:
        raise CorruptStream(
            f"{event_type(event)} for unknown delivery {delivery_id!r} "
            f"in stream {state.stream!r}"
        )
    return delivery


def _pending(state: JobState, event: Event, delivery_id: str) -> Delivery:
    delivery = _known(state, event, delivery_id)
    if delivery.status.is_final:
        raise CorruptStream(
            f"{event_type(event)} for delivery {delivery_id!r}, "
            f"already {delivery.status.value}"
        )
    return delivery


def evolve(state: JobState, event: Event) -> JobState:
    """Apply one event.  Raises :class:`CorruptStream` for an impossible sequence."""
    state = _apply(state, event)
    return _replace(state, version=state.version + 1)


def _apply(state: JobState, event: Event) -> JobState:  # noqa: C901 - one branch per event
    if isinstance(event, Published):
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
        return _replace(state, deliveries=deliveries)
    if isinstance(event, Claimed):
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
            claims=delivery.claims + 1,
        )
    if isinstance(event, LeaseRenewed):
        delivery = _claimed_by(state, event, event.delivery, event.claim)
        return _with_delivery(state, delivery, lease_until=event.lease_until)
    if isinstance(event, Acked):
        delivery = _claimed_by(state, event, event.delivery, event.claim)
        return _with_delivery(state, delivery, status=DeliveryStatus.ACKED, lease_until=None)
    if isinstance(event, Requeued):
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
        )
    if isinstance(event, LeaseExpired):
        delivery = _claimed_by(state, event, event.delivery, event.claim)
        return _with_delivery(
            state,
            delivery,
            status=DeliveryStatus.READY,
            claim=None,
            consumer=None,
            lease_until=None,
            lost_claims=delivery.lost_claims + 1,
            reason="lease expired",
        )
    if isinstance(event, DeadLettered):
        delivery = _pending(state, event, event.delivery)
        state = _with_delivery(
            state, delivery, status=DeliveryStatus.DEAD, lease_until=None, reason=event.reason
        )
        if state.result_state in _UNFINISHED and not state.pending():
            # Nothing will run it again: a waiter must not wait forever.
            state = _replace(
                state, result_state=ResultState.FAILURE, result=None, custom_state=None
            )
        return state
    if isinstance(event, DeadLetterPurged):
        delivery = _known(state, event, event.delivery)
        if delivery.status is not DeliveryStatus.DEAD:
            raise CorruptStream(f"purged delivery {event.delivery!r} is {delivery.status.value}")
        return state
    if isinstance(event, Discarded):
        delivery = _pending(state, event, event.delivery)
        if delivery.status is DeliveryStatus.CLAIMED:
            raise CorruptStream(f"claimed delivery {event.delivery!r} discarded")
        state = _with_delivery(
            state, delivery, status=DeliveryStatus.DISCARDED, reason=event.reason
        )
        if event.reason == "expired" and state.result_state is ResultState.PENDING:
            # Celery reports a task that expired unrun as REVOKED.
            state = _replace(state, result_state=ResultState.REVOKED)
        elif event.reason == "revoked" and _running(state) and not state.pending():
            # The run that kept its state through the revoke was lost (its lease
            # ran out) and will not run again: a waiter must not wait forever.
            state = _replace(
                state, result_state=ResultState.REVOKED, result=None, custom_state=None
            )
        return state
    if isinstance(event, Revoked):
        if state.result_state is ResultState.SUCCESS or _running(state):
            # A revoke does not stop a running task (Celery's terminate does):
            # its state stays the running worker's to report, as with Celery's
            # own backends.  Only its later deliveries are discarded.
            return _replace(state, revoked=True)
        return _replace(
            state, revoked=True, result_state=ResultState.REVOKED, result=event.result,
            custom_state=None,
        )
    if isinstance(event, StateUpdated):
        state = _result(state, ResultState.STARTED, event.result)
        return _replace(state, custom_state=event.state)
    if isinstance(event, Forgotten):
        return _replace(state, forgotten=True)
    if isinstance(event, GroupSaved):
        return _replace(
            state, result_state=ResultState.SUCCESS, result=event.result, forgotten=False
        )
    if isinstance(event, GroupDeleted):
        return _replace(state, result_state=ResultState.PENDING, result=None)
    if isinstance(event, ChordPartDone):
        if event.task_id in state.chord_parts:
            raise CorruptStream(f"chord part {event.task_id!r} counted twice")
        return _replace(state, chord_parts=state.chord_parts | {event.task_id})
    if isinstance(event, ChordCompleted):
        if state.chord_completed:
            raise CorruptStream(f"chord {state.stream!r} completed twice")
        return _replace(state, chord_completed=True)
    if isinstance(event, Started):
        return _result(state, ResultState.STARTED, event.result)
    if isinstance(event, RetryScheduled):
        return _result(state, ResultState.RETRY, event.result)
    if isinstance(event, Succeeded):
        return _result(state, ResultState.SUCCESS, event.result)
    if isinstance(event, Failed):
        return _result(state, ResultState.FAILURE, event.result)
    raise CorruptStream(f"not an event: {event!r}")


_UNFINISHED = (ResultState.PENDING, ResultState.STARTED, ResultState.RETRY)


def _running(state: JobState) -> bool:
    """A worker has reported the task started (or a custom state such as PROGRESS)."""
    return state.result_state is ResultState.STARTED or (
        state.custom_state is not None and state.result_state in _UNFINISHED
    )


def _result(state: JobState, new: ResultState, result: JSON | None) -> JobState:
    if state.result_state is ResultState.SUCCESS:
        raise CorruptStream(f"{new.value} recorded after SUCCESS in {state.stream!r}")
    return _replace(
        state, result_state=new, result=result, forgotten=False, custom_state=None
    )


def fold(stream: str, events: Iterable[Event]) -> JobState:
    """The state a stream's events add up to."""
    state = JobState(stream=stream)
    for event in events:
        state = evolve(state, event)
    return state


# ---------------------------------------------------------------------------
# decide: command + state + now -> events
# ---------------------------------------------------------------------------


def _current_claim(state: JobState, delivery_id: str, claim: str) -> Delivery:
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


def _unless_revoked(state: JobState, requeued: Requeued) -> list[Event]:
    """A delivery given back after its task was revoked is discarded, not re-run."""
    if state.revoked:
        return [requeued, Discarded(requeued.delivery, "revoked")]
    return [requeued]


def decide(command: Command, state: JobState, now: float) -> list[Event]:  # noqa: C901
    """The events ``command`` produces in ``state`` at time ``now``.

    Raises :class:`InvalidTransition` (or a subclass) when the command is not
    allowed; the state is never partially changed because nothing is written.
    An empty list means the command is satisfied already (idempotent no-op).
    """
    if isinstance(command, Publish):
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
        if command.delivery in state.deliveries:
            raise InvalidTransition(f"delivery {command.delivery!r} already published")
        if state.revoked:
            return [published, Discarded(command.delivery, "revoked")]
        return [published]

    if isinstance(command, Claim):
        delivery = state.delivery(command.delivery)
        events: list[Event] = []
        if delivery.status is DeliveryStatus.CLAIMED:
            if not delivery.lease_expired(now):
                raise NotClaimable(f"delivery {delivery.id!r} is claimed until its lease ends")
            assert delivery.claim is not None
            events.append(LeaseExpired(delivery.id, delivery.claim))
            lost = delivery.lost_claims + 1
        elif delivery.status.is_final:
            raise NotClaimable(f"delivery {delivery.id!r} is {delivery.status.value}")
        else:
            lost = delivery.lost_claims
        if not delivery.is_due(now):
            raise NotClaimable(f"delivery {delivery.id!r} is scheduled for later")
        if state.revoked:
            # Claimed before the revoke, then given back: it must not run now.
            events.append(Discarded(delivery.id, "revoked"))
        elif command.max_claims is not None and lost >= command.max_claims:
            events.append(
                DeadLettered(
                    delivery.id,
                    f"claimed {lost} times without an outcome (lease expired each time)",
                )
            )
        elif delivery.is_expired(now):
            events.append(Discarded(delivery.id, "expired"))
        else:
            events.append(
                Claimed(
                    delivery.id,
                    command.claim,
                    command.consumer,
                    lease_until=now + command.lease_seconds,
                )
            )
        return events

    if isinstance(command, Renew):
        _current_claim(state, command.delivery, command.claim)
        return [LeaseRenewed(command.delivery, command.claim, now + command.lease_seconds)]

    if isinstance(command, Ack):
        _current_claim(state, command.delivery, command.claim)
        return [Acked(command.delivery, command.claim)]

    if isinstance(command, Reject):
        _current_claim(state, command.delivery, command.claim)
        if command.requeue:
            not_before = now + command.countdown if command.countdown else None
            return _unless_revoked(
                state, Requeued(command.delivery, command.claim, command.reason, not_before)
            )
        return [DeadLettered(command.delivery, command.reason)]

    if isinstance(command, Restore):
        _current_claim(state, command.delivery, command.claim)
        return _unless_revoked(state, Requeued(command.delivery, command.claim, "restored"))

    if isinstance(command, Discard):
        delivery = state.delivery(command.delivery)
        if delivery.status.is_final:
            return []
        if delivery.status is DeliveryStatus.CLAIMED:
            raise InvalidTransition(f"delivery {delivery.id!r} is claimed; it cannot be discarded")
        return [Discarded(delivery.id, command.reason)]

    if isinstance(command, PurgeDeadLetter):
        delivery = state.delivery(command.delivery)
        if delivery.status is not DeliveryStatus.DEAD:
            raise InvalidTransition(f"delivery {delivery.id!r} is not dead-lettered")
        return [DeadLetterPurged(delivery.id)]

    if isinstance(command, Revoke):
        if state.revoked:
            return []
        revoked: list[Event] = [Revoked(command.reason, command.result)]
        return revoked + [
            Discarded(d.id, "revoked")
            for d in state.pending()
            if d.status is not DeliveryStatus.CLAIMED
        ]

    if isinstance(command, Forget):
        return [] if state.forgotten else [Forgotten()]
    if isinstance(command, SaveGroup):
        return [GroupSaved(command.result)]
    if isinstance(command, DeleteGroup):
        return [GroupDeleted()] if state.result is not None else []
    if isinstance(command, CountChordPart):
        if command.task_id in state.chord_parts or state.chord_completed:
            return []
        done: list[Event] = [ChordPartDone(command.task_id, command.state)]
        if len(state.chord_parts) + 1 >= command.size:
            done.append(ChordCompleted(command.size))
        return done

    # Result states: once SUCCESS is recorded later writes are ignored, as in Celery.
    if state.result_state is ResultState.SUCCESS:
        return []
    if isinstance(command, Start):
        return [Started(command.worker, command.result)]
    if isinstance(command, ScheduleRetry):
        return [RetryScheduled(command.exc, command.countdown, command.result)]
    if isinstance(command, Succeed):
        return [Succeeded(command.result)]
    if isinstance(command, Fail):
        return [Failed(command.exc, command.traceback, command.result)]
    if isinstance(command, UpdateState):
        return [StateUpdated(command.state, command.result)]
    raise InvalidTransition(f"not a command: {command!r}")
