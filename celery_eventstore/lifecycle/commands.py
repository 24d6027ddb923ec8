"""Commands: what a producer, consumer, worker or operator asks of one stream.

:func:`~celery_eventstore.lifecycle.decide` turns a command into events, by the
rules of the stream's kind; a command of another kind's is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from .events import JSON


class Command:
    """The base of every command."""

    __slots__ = ()


# -- deliveries (task streams) ----------------------------------------------------


@dataclass(frozen=True)
class Publish(Command):
    """Publish a message.

    Publishing a delivery id already held is a no-op when it names the same
    queue (a producer retrying a publish whose commit it could not confirm) and
    refused otherwise.
    """

    delivery: str
    queue: str
    message: JSON
    priority: int = 0
    not_before: float | None = None
    expires: float | None = None
    retry_of: str | None = None


@dataclass(frozen=True)
class Claim(Command):
    """Take a delivery for ``lease_seconds``.

    A delivery whose ``max_claims`` leases already ran out is dead-lettered
    instead; one past its expiry is discarded.  ``max_claims=None`` means no limit.
    """

    delivery: str
    claim: str
    consumer: str
    lease_seconds: float
    max_claims: int | None = None


@dataclass(frozen=True)
class Renew(Command):
    """Extend the current claim's lease to ``lease_seconds`` from now."""

    delivery: str
    claim: str
    lease_seconds: float


@dataclass(frozen=True)
class Ack(Command):
    """Settle the delivery as done; only its current claim may."""

    delivery: str
    claim: str


@dataclass(frozen=True)
class Reject(Command):
    """Give the delivery back (``requeue``) or dead-letter it."""

    delivery: str
    claim: str
    requeue: bool
    reason: str = "rejected"
    countdown: float | None = None


@dataclass(frozen=True)
class Restore(Command):
    """A consumer shut down holding the claim: ready again, no claim counted lost."""

    delivery: str
    claim: str


@dataclass(frozen=True)
class Discard(Command):
    """Drop a pending, unclaimed delivery (purge)."""

    delivery: str
    reason: str


@dataclass(frozen=True)
class PurgeDeadLetter(Command):
    """Remove a dead letter from the dead-letter list (an operator's decision)."""

    delivery: str


# -- the task's result (task streams) --------------------------------------------
#
# ``claim`` is the claim the worker's message was delivered under (the
# transport's ``eventstore_claim`` header); None for a result written from
# elsewhere.  It names the delivery the result came from, and fences out a
# result from a claim that another claim took over.


@dataclass(frozen=True)
class Revoke(Command):
    """Revoke the task: its pending, unclaimed deliveries are discarded."""

    reason: str = "revoked"
    result: JSON | None = None


@dataclass(frozen=True)
class UpdateState(Command):
    """Record a state of the task's own making (``task.update_state``)."""

    state: str
    result: JSON | None = None
    claim: str | None = None


@dataclass(frozen=True)
class Start(Command):
    """Record that a worker started the task."""

    worker: str | None = None
    result: JSON | None = None
    claim: str | None = None


@dataclass(frozen=True)
class ScheduleRetry(Command):
    """Record that the task raised Retry."""

    exc: str
    countdown: float | None = None
    result: JSON | None = None
    claim: str | None = None


@dataclass(frozen=True)
class Succeed(Command):
    """Record the task's return value."""

    result: JSON | None = None
    claim: str | None = None


@dataclass(frozen=True)
class Fail(Command):
    """Record the task's exception."""

    exc: str
    traceback: str | None = None
    result: JSON | None = None
    claim: str | None = None


@dataclass(frozen=True)
class Forget(Command):
    """Forget the result (task and group streams); the history stays."""


@dataclass(frozen=True)
class ExpireResult(Command):
    """Expire a final result (task and group streams); the history stays.
    Nothing to do for a stream without one, or whose result is gone already."""


# -- groups and chords (their own streams) ----------------------------------------


@dataclass(frozen=True)
class SaveGroup(Command):
    """Save a group's member results."""

    result: JSON


@dataclass(frozen=True)
class DeleteGroup(Command):
    """Delete a saved group; nothing to do if none is saved."""


@dataclass(frozen=True)
class CountChordPart(Command):
    """Count a finished header task; the count reaching ``size`` completes the chord.

    Counting the same task twice (a redelivered header task) changes nothing, so
    the callback is due exactly once whatever the delivery count.
    """

    task_id: str
    state: str
    size: int
