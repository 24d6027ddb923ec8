"""Events: immutable past-tense facts, and how they are stored.

Every event class subclasses :class:`Event`, which registers it under its class
name in :data:`EVENT_TYPES`: the class list is written once, here, and
:func:`event_type`, :func:`event_data` and :func:`event_from` all read it.

An event's class name is its stored type and its field names are the JSON keys
stored in the log, so renaming either is a schema migration.  Which stream kind
may hold an event is said by the kind's rules (``task.py``, ``group.py``,
``chord.py``), not here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..exceptions import CorruptStream

JSON = Mapping[str, Any]

#: Every event class by its stored type name; filled by :class:`Event` subclasses.
EVENT_TYPES: dict[str, type[Event]] = {}


class Event:
    """The base of every event; subclassing it registers the event type."""

    __slots__ = ()
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # each is a dataclass

    def __init_subclass__(cls, stored: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not stored:
            return
        if cls.__name__ in EVENT_TYPES:
            raise TypeError(f"event type {cls.__name__!r} defined twice")
        EVENT_TYPES[cls.__name__] = cls


def event_type(event: Event) -> str:
    """The name an event is stored under."""
    return type(event).__name__


def event_data(event: Event) -> dict[str, Any]:
    """The JSON-able fields of an event."""
    names = _FIELD_NAMES.get(type(event))
    if names is None:  # dataclasses.fields() filters every field on each call: once per type
        names = _FIELD_NAMES[type(event)] = tuple(f.name for f in dataclasses.fields(event))
    return {name: getattr(event, name) for name in names}


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def event_from(type_name: str, data: Mapping[str, Any]) -> Event:
    """Rebuild an event from its stored type name and data."""
    try:
        return EVENT_TYPES[type_name](**data)
    except KeyError:
        raise CorruptStream(f"unknown event type {type_name!r}") from None
    except TypeError as exc:
        raise CorruptStream(f"unreadable event {type_name!r}: {exc}") from None


# -- a delivery's life (task streams) ---------------------------------------------


@dataclass(frozen=True)
class Published(Event):
    """A message was published to ``queue``; deliverable from ``not_before``."""

    delivery: str
    queue: str
    message: JSON
    priority: int = 0
    not_before: float | None = None
    expires: float | None = None
    #: The dead-lettered delivery this one publishes again, if any.
    retry_of: str | None = None


@dataclass(frozen=True)
class Claimed(Event):
    """A consumer took the delivery; it is theirs until ``lease_until``."""

    delivery: str
    claim: str
    consumer: str
    lease_until: float


@dataclass(frozen=True)
class LeaseRenewed(Event):
    """The current claim's holder is still working and extended its lease."""

    delivery: str
    claim: str
    lease_until: float


@dataclass(frozen=True)
class Acked(Event):
    """The current claim's holder acknowledged the delivery: it is done."""

    delivery: str
    claim: str


@dataclass(frozen=True)
class Requeued(Event):
    """The claim was given back (``reason``: rejected, restored); ready again."""

    delivery: str
    claim: str
    reason: str
    not_before: float | None = None
    #: The claim's run ended without an outcome (a reject with requeue, which
    #: Celery sends when the pool process running the task died; a restore of a
    #: task that had started): it counts towards ``max_claims`` like a lost lease.
    lost: bool = False


@dataclass(frozen=True)
class LeaseExpired(Event):
    """A claim's lease ran out without an outcome; the holder is presumed dead."""

    delivery: str
    claim: str
    #: Whether the claim had seen its task start (a result event followed it).  A
    #: lease lost by a message that never started -- one prefetched beside a task
    #: that killed the worker -- counts towards a larger budget than
    #: ``max_claims``.  Rows written before this field existed read as started:
    #: every lost lease counted towards ``max_claims`` then.
    started: bool = True


@dataclass(frozen=True)
class DeadLettered(Event):
    """The delivery will not be delivered again; ``reason`` says why."""

    delivery: str
    reason: str


@dataclass(frozen=True)
class DeadLetterPurged(Event):
    """An operator removed a dead letter from the dead-letter list; its story stays."""

    delivery: str


@dataclass(frozen=True)
class Discarded(Event):
    """The delivery was dropped before running (``reason``: expired, revoked, purged)."""

    delivery: str
    reason: str


# -- a task's result (task streams) -----------------------------------------------
#
# A result a worker wrote names the delivery it ran (``delivery``); one written
# from elsewhere (another broker, an eager call, ``mark_as_done``) names none.


@dataclass(frozen=True)
class Revoked(Event):
    """The task was revoked: none of its pending deliveries will run."""

    reason: str = "revoked"
    result: JSON | None = None


@dataclass(frozen=True)
class StateUpdated(Event):
    """The task reported a state of its own (``task.update_state``)."""

    state: str
    result: JSON | None = None
    delivery: str | None = None


@dataclass(frozen=True)
class Started(Event):
    """A worker started executing the task."""

    worker: str | None = None
    result: JSON | None = None
    delivery: str | None = None


@dataclass(frozen=True)
class RetryScheduled(Event):
    """The task raised Retry; it will run again (``countdown`` seconds later)."""

    exc: str
    countdown: float | None = None
    result: JSON | None = None
    delivery: str | None = None


@dataclass(frozen=True)
class Succeeded(Event):
    """The task returned; ``result`` is the result as the backend encoded it."""

    result: JSON | None = None
    delivery: str | None = None


@dataclass(frozen=True)
class Failed(Event):
    """The task raised ``exc``."""

    exc: str
    traceback: str | None = None
    result: JSON | None = None
    delivery: str | None = None


@dataclass(frozen=True)
class ResultFenced(Event):
    """A result (``state``) came from a claim of the delivery that another claim
    took over after its lease ran out: kept for the history, it changes nothing."""

    delivery: str
    claim: str
    state: str


@dataclass(frozen=True)
class Forgotten(Event):
    """The result was forgotten (``AsyncResult.forget()``); the history stays.

    Task and group streams."""


@dataclass(frozen=True)
class ResultExpired(Event):
    """The result outlived Celery's ``result_expires`` and was expired
    (``backend_cleanup``): the backend reports the task as unknown (``PENDING``),
    as Celery's own backends do; the history stays until it is pruned.

    Task and group streams."""


# -- corrupt streams ---------------------------------------------------------------


@dataclass(frozen=True)
class Quarantined(Event):
    """The delivery's stream holds an event that cannot be read, so nothing can be
    decided for it: it leaves the queue as a dead letter.  ``queue`` is recorded
    here because the stream cannot say it."""

    delivery: str
    queue: str
    reason: str


@dataclass(frozen=True)
class Unreadable(Event, stored=False):
    """Stands in, when reading, for a stored event that cannot be decoded: bad
    JSON, an unknown type, missing fields.  Never written; folding a stream that
    holds one fails with the reason."""

    type: str
    reason: str


# -- groups and chords (their own streams) ----------------------------------------


@dataclass(frozen=True)
class GroupSaved(Event):
    """A group's member results were saved (stream ``group:<id>``)."""

    result: JSON


@dataclass(frozen=True)
class GroupDeleted(Event):
    """A saved group was deleted."""


@dataclass(frozen=True)
class ChordPartDone(Event):
    """A header task of a chord finished (stream ``chord:<group id>``)."""

    task_id: str
    state: str


@dataclass(frozen=True)
class ChordCompleted(Event):
    """The last header task finished: the chord's callback is due, exactly once."""

    size: int
