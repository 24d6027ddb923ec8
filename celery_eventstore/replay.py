"""Point-in-time replay: every queue as it was at a log position or a time.

Folded from the log with the lifecycle model, not read from a snapshot or the
derived tables::

    from celery_eventstore.replay import replay

    then = replay(store, position=1200)          # or at=<epoch seconds>
    for queue in then.queues:
        print(queue.queue, queue.ready, queue.in_flight)

A message is where the events up to that point put it: *ready* (claimable then),
*scheduled* (its ETA not reached then), *in flight* (claimed, with the consumer
holding it) or *dead* (dead-lettered, not retried or purged yet).  The counts are
those ``celery-eventstore queues`` showed at that moment: a message past its
expiry or lease still counts where it was until a consumer found it so.  The
replay reads the log from the start up to that point (and to its end for a time,
because positions and times order commits slightly differently).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

from . import lifecycle as lc
from .exceptions import UnreadableStream
from .storage import EventStore, RecordedEvent, fold_stream

#: Events read per round trip.
BATCH = 5000


@dataclass(frozen=True)
class QueueAt:
    """One queue at the replayed point: the task ids (streams) in each state."""

    queue: str
    ready: list[str] = field(default_factory=list)
    scheduled: list[str] = field(default_factory=list)
    #: ``(task id, consumer)`` of each claimed message.
    in_flight: list[tuple[str, str]] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "ready": len(self.ready),
            "scheduled": len(self.scheduled),
            "claimed": len(self.in_flight),
            "dead": len(self.dead),
        }

    def as_json(self) -> dict[str, object]:
        return {
            "queue": self.queue,
            **self.counts(),
            "tasks": {
                "ready": self.ready,
                "scheduled": self.scheduled,
                "in_flight": [{"task": t, "worker": w} for t, w in self.in_flight],
                "dead": self.dead,
            },
        }


@dataclass(frozen=True)
class Replay:
    """The queues at ``position`` (the last event replayed) and ``time``."""

    position: int
    time: float
    queues: list[QueueAt]
    #: Streams left out because an event of theirs up to the point cannot be read.
    unreadable: list[UnreadableStream] = field(default_factory=list)


def replay(
    store: EventStore, *, position: int | None = None, at: float | None = None
) -> Replay:
    """The queues after the event at log ``position``, or as of time ``at`` (epoch
    seconds: every event recorded then or before).  Exactly one must be given."""
    if (position is None) == (at is None):
        raise ValueError("give a log position or a time, not both or neither")
    streams: dict[str, list[RecordedEvent]] = defaultdict(list)
    last_position, last_time = 0, 0.0
    for rec in _events(store, position):
        # Times are given to the microsecond at most (ISO-8601): an event recorded
        # within the microsecond written is "then", not after it.
        if at is not None and _microseconds(rec.recorded_at) > _microseconds(at):
            continue
        streams[rec.stream].append(rec)
        last_position = max(last_position, rec.position)
        last_time = max(last_time, rec.recorded_at)
    now = at if at is not None else last_time
    return _fold_queues(streams, now, last_position if position is None else position)


def _microseconds(seconds: float) -> int:
    return int(seconds * 1_000_000)


def _events(store: EventStore, until: int | None) -> Iterator[RecordedEvent]:
    after = 0
    while batch := store.read_all(after=after, limit=BATCH):
        for rec in batch:
            if until is not None and rec.position > until:
                return
            yield rec
        after = batch[-1].position


def _fold_queues(
    streams: dict[str, list[RecordedEvent]], now: float, position: int
) -> Replay:
    queues: dict[str, QueueAt] = {}
    unreadable: list[UnreadableStream] = []

    def queue(name: str) -> QueueAt:
        return queues.setdefault(name, QueueAt(name))

    for stream, recs in streams.items():
        if lc.stream_kind(stream) is not lc.StreamKind.TASK:
            continue
        # Dead letters leave the list when published again or purged.
        gone = {
            ev.retry_of if isinstance(ev, lc.Published) else ev.delivery
            for ev in (r.event for r in recs)
            if isinstance(ev, lc.DeadLetterPurged)
            or (isinstance(ev, lc.Published) and ev.retry_of)
        }
        try:
            state = fold_stream(stream, recs)
        except UnreadableStream as error:
            unreadable.append(error)
            continue
        assert isinstance(state, lc.TaskState)
        for delivery in state.deliveries.values():
            status = delivery.status
            if status is lc.DeliveryStatus.READY:
                target = queue(delivery.queue)
                (target.ready if delivery.is_due(now) else target.scheduled).append(stream)
            elif status is lc.DeliveryStatus.CLAIMED:
                queue(delivery.queue).in_flight.append((stream, delivery.consumer or "?"))
            elif status is lc.DeliveryStatus.DEAD and delivery.id not in gone:
                queue(delivery.queue).dead.append(stream)
    return Replay(
        position=position,
        time=now,
        queues=[queues[name] for name in sorted(queues)],
        unreadable=unreadable,
    )
