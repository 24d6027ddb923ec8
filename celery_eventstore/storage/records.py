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
    queue: str
    ready: int = 0
    scheduled: int = 0
    claimed: int = 0
    dead: int = 0
    oldest_seq: int | None = None



@dataclass(frozen=True)
class DeadLetter:
    delivery: str
    stream: str
    queue: str
    reason: str
    dead_at: float
