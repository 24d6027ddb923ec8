"""Plain values that go in and out of the store."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..lifecycle import Event


@dataclass(frozen=True)
class RecordedEvent:
    """An event as the log holds it."""

    position: int
    stream: str
    version: int
    event: Event
    metadata: Mapping[str, Any] | None
    recorded_at: float

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

    @property
    def ref(self) -> ClaimRef:
        return ClaimRef(self.stream, self.delivery, self.claim)


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
