"""Plain values that go in and out of the store."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..lifecycle import Event, JobState


@dataclass(frozen=True)
class RecordedEvent:
    """An event as the log holds it."""

    position: int
    stream: str
    version: int
    event: Event
    metadata: Mapping[str, Any] | None
    recorded_at: float
    #: The stream's birth day (days since the epoch): its partition on a
    #: partitioned log; None on events older than schema version 7.
    born: int | None = field(default=None, compare=False)

    @property
    def type(self) -> str:
        return type(self.event).__name__


@dataclass(frozen=True)
class NewMessage:
    """A message to publish.  ``stream`` is the task id (or the message's own id)."""

    stream: str
    queue: str
    message: Mapping[str, Any]
    priority: int = 0
    not_before: float | None = None
    expires: float | None = None
    delivery: str | None = None  # generated when None
    metadata: Mapping[str, Any] | None = None
    #: A hint that ``stream`` has no events yet (a new task id): publish then
    #: skips reading it, and falls back to the read if the hint was wrong.
    new_stream: bool = False


@dataclass(frozen=True)
class ClaimedMessage:
    """A delivery a consumer now holds.  ``claim`` fences its ack, reject and renewal."""

    delivery: str
    claim: str
    stream: str
    queue: str
    message: Mapping[str, Any]
    priority: int
    lease_until: float
    redelivered: bool
    #: Its stream's state as the claim left it: what the worker's result write
    #: may be decided on (:meth:`EventStore.execute`'s ``known``).
    state: JobState | None = field(default=None, compare=False, repr=False)

    @property
    def ref(self) -> ClaimRef:
        return ClaimRef(self.stream, self.delivery, self.claim)


@dataclass(frozen=True)
class ClaimRound:
    """One round of a consumer's work in one transaction: the outcomes of the
    acks it wrote, the messages it claimed, ``next_due``, the earliest ETA in
    its queues later than the time it claimed at (None when there is none, or
    it did not ask), and ``nominated``, how many due messages it took up: those
    it claimed and those it settled instead (expired, dead-lettered, finished).
    A round that nominated its limit may have left more waiting, however few
    it claimed.  ``at`` is the time it claimed at (the store's clock, as the
    nomination compared ETAs with): ``next_due - at`` is how long until the
    next ETA is due by the same clock, with no estimate of this host's offset
    from it."""

    outcomes: dict[str, Outcome]
    claimed: list[ClaimedMessage]
    next_due: float | None = None
    nominated: int = 0
    at: float | None = None


@dataclass(frozen=True)
class ScheduledMessage:
    """A message the store holds until its ETA (``not_before``)."""

    stream: str
    delivery: str
    queue: str
    priority: int
    not_before: float
    message: Mapping[str, Any]


@dataclass(frozen=True)
class ClaimRef:
    """What a consumer keeps to settle or renew a claim later."""

    stream: str
    delivery: str
    claim: str


class Outcome(str, Enum):
    """What became of one settle or renew request."""

    DONE = "done"
    STALE = "stale"  # the claim was no longer current: nothing written


@dataclass(frozen=True)
class QueueStats:
    """One queue's messages by state, as :meth:`EventStore.queue_stats` counts them."""

    queue: str
    #: Claimable now.
    ready: int = 0
    #: Waiting for their ETA (countdown, retry delay).
    scheduled: int = 0
    #: Held by a consumer under a lease (in flight).
    claimed: int = 0
    #: Dead letters not retried or purged.
    dead: int = 0
    #: Log position of the oldest message in the queue (any state but dead).
    oldest_seq: int | None = None
    #: Seconds the oldest ready message has been claimable (since it was published
    #: or became due); None when nothing is ready.
    oldest_ready_age: float | None = None
    #: Seconds since the oldest in-flight message was claimed; None when none is.
    oldest_lease_age: float | None = None


@dataclass(frozen=True)
class DeadLetter:
    """A dead-lettered delivery nobody published again or purged yet."""

    #: The delivery (message) id: what ``retry_dead`` takes.
    delivery: str
    #: The task id.
    stream: str
    queue: str
    #: Why: the lease ran out ``max_claims`` times, or a consumer rejected it.
    reason: str
    #: When, in epoch seconds.
    dead_at: float


@dataclass(frozen=True)
class TaskSummary:
    """One task as the task index holds it (:meth:`EventStore.tasks`)."""

    #: The task id (its stream).
    task_id: str
    #: The task's name, from its first message (None for a stream begun by a result
    #: written from elsewhere, or a plain kombu message).
    name: str | None
    #: Its state as the history tells it: Celery's state names, or a custom state.
    #: Expiring or forgetting the result leaves it as it was.
    state: str
    #: The queue of its latest message.
    queue: str | None
    #: The worker (Celery's hostname) that last reported the task started.
    worker: str | None
    parent_id: str | None
    root_id: str | None
    #: The group it is a member of.
    group_id: str | None
    #: When its stream began (its first publish), in epoch seconds.
    created_at: float


@dataclass(frozen=True)
class TaskFilter:
    """What :meth:`EventStore.tasks` selects; every field left None matches all.

    ``since``/``until`` bound when a task began (epoch seconds, inclusive)."""

    name: str | None = None
    state: str | None = None
    queue: str | None = None
    worker: str | None = None
    parent_id: str | None = None
    root_id: str | None = None
    group_id: str | None = None
    since: float | None = None
    until: float | None = None

    def given(self) -> dict[str, Any]:
        """The fields that select something, by name."""
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class LogFilter:
    """Which events :meth:`EventStore.read_log` returns; None matches all.

    ``types`` are stored type names; ``name``/``queue`` select the task streams
    the task index gives that name or latest queue; ``since``/``until`` bound
    when an event was recorded (epoch seconds, inclusive)."""

    types: tuple[str, ...] | None = None
    name: str | None = None
    queue: str | None = None
    since: float | None = None
    until: float | None = None

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}
