"""A task's history, read from its stream: for people (a timeline) and for code.

::

    from celery_eventstore.history import history, format_timeline

    entries = history(store, task_id)
    print(format_timeline(entries))
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from . import lifecycle as lc
from .storage import EventStore, RecordedEvent


@dataclass(frozen=True)
class Entry:
    """One line of a task's history."""

    time: float
    version: int
    event: str
    #: The attempt: 1 for the task's first message, 2 for the next one (a retry's,
    #: or one published again from the dead letters), ...  Results and states
    #: (``Started``, ``RetryScheduled``, ``Succeeded``...) carry the attempt whose
    #: message the worker ran (the one claimed last, for results written before
    #: results named their delivery, or from elsewhere).
    delivery: int | None = None
    worker: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["time"] = iso_time(self.time)
        return data


def history(store: EventStore, task_id: str) -> list[Entry]:
    """Every event of ``task_id``'s stream, oldest first, as :class:`Entry` values."""
    return entries_of(store.read_stream(task_id))


def entries_of(recorded: Sequence[RecordedEvent]) -> list[Entry]:
    """One stream's events (oldest first) as :class:`Entry` values."""
    numbers: dict[str, int] = {}
    consumers: dict[str, str] = {}  # by delivery: its last claim's
    claimers: dict[str, str] = {}  # by claim
    running: int | None = None  # the attempt a worker holds: the last one claimed
    out = []
    for rec in recorded:
        ev = rec.event
        delivery = getattr(ev, "delivery", None)
        if isinstance(ev, lc.Published):
            numbers[ev.delivery] = len(numbers) + 1
        if isinstance(ev, lc.Claimed):
            consumers[ev.delivery] = claimers[ev.claim] = ev.consumer
            running = numbers.get(ev.delivery)
        number = numbers.get(delivery) if delivery else None
        if isinstance(ev, _RUN_EVENTS) and delivery is None:
            number = running
        consumer = claimers.get(ev.claim) if isinstance(ev, lc.ResultFenced) else None
        out.append(
            Entry(
                time=rec.recorded_at,
                version=rec.version,
                event=rec.type,
                delivery=number,
                worker=_worker(ev, consumer or consumers.get(delivery or "")),
                detail=_detail(ev, rec.metadata or {}, rec.recorded_at),
            )
        )
    return out


#: What a worker records while it runs an attempt; one written before results named
#: their delivery is shown with the attempt claimed last.
_RUN_EVENTS = (lc.Started, lc.StateUpdated, lc.RetryScheduled, lc.Succeeded, lc.Failed)


def canvas(store: EventStore, stream: str) -> list[str]:
    """Every stream of ``stream``'s canvas, in the order they began.

    Streams are linked by what their messages say -- ``parent_id``, ``root_id`` and
    ``group`` (whose ``group:``/``chord:`` streams join too) -- and ``stream`` is
    followed through those links both ways: forwards by reading each stream,
    backwards by the log's indexes on ``root_id`` and ``group`` (every task of a
    canvas names its root), so only the canvas's own streams are read.
    """
    first: dict[str, int] = {}
    seen, frontier = {stream}, [stream]
    while frontier:
        current = frontier.pop()
        recorded = store.read_stream(current)
        if recorded:
            first[current] = recorded[0].position
        for other in _links(store, current, recorded):
            if other not in seen:
                seen.add(other)
                frontier.append(other)
    # A link may name a stream with no events (pruned, or an id never published).
    return sorted(first, key=first.__getitem__)


def _links(store: EventStore, stream: str, recorded: Sequence[RecordedEvent]) -> set[str]:
    """The streams ``stream`` links to, and those that link to it."""
    links: set[str] = set()
    roots: set[str] = set()
    for rec in recorded:
        meta = rec.metadata or {}
        if isinstance(rec.event, lc.Published):
            links.update(meta[key] for key in ("parent_id", "root_id") if meta.get(key))
            roots.update([meta["root_id"]] if meta.get("root_id") else [])
            if meta.get("group"):
                links.add(lc.group_stream(meta["group"]))
    group = lc.group_of(stream)
    if group is None:
        # Only a root is named by others' root_id: the rest of a tree is found
        # from its root, one lookup per canvas rather than one per task.
        if not roots - {stream}:
            links.update(store.streams_linked("root_id", stream))
    else:  # a group's members, its saved result and its chord counter
        links.update(store.streams_linked("group", group))
        links.update((lc.group_stream(group), lc.chord_stream(group)))
    links.discard(stream)
    return links


def _worker(ev: lc.Event, consumer: str | None) -> str | None:
    if isinstance(ev, lc.Started):
        return ev.worker
    if isinstance(ev, (lc.Claimed, lc.LeaseRenewed, lc.Acked, lc.Requeued, lc.LeaseExpired,
                       lc.ResultFenced)):
        return consumer
    return None


def _detail(ev: lc.Event, metadata: Mapping[str, Any], at: float) -> dict[str, Any]:
    if isinstance(ev, lc.Published):
        return _published_detail(ev, metadata)
    if isinstance(ev, (lc.Claimed, lc.LeaseRenewed)):
        return {"lease_until": iso_time(ev.lease_until)}
    if isinstance(ev, lc.LeaseExpired):  # which claim budget the loss spent
        return {} if ev.started else {"started": False}
    if isinstance(ev, lc.Requeued):
        return {"reason": ev.reason, **({"lost": True} if ev.lost else {})}
    if isinstance(ev, (lc.DeadLettered, lc.Discarded, lc.Revoked, lc.Quarantined,
                       lc.Unreadable)):
        return {"reason": ev.reason}
    if isinstance(ev, lc.RetryScheduled):
        return {"exc": ev.exc, **({"countdown": ev.countdown} if ev.countdown else {})}
    if isinstance(ev, lc.Failed):
        return {"exc": ev.exc}
    if isinstance(ev, lc.Succeeded) and ev.result is not None:
        return {"result": _result_summary(ev.result)}
    if isinstance(ev, lc.ResultFenced):  # a claim taken over: not the outcome
        return {"state": ev.state, "claim": ev.claim}
    if isinstance(ev, lc.ChordPartDone):  # which header task it counts
        return {"task_id": ev.task_id, "state": ev.state}
    return {}


def _published_detail(ev: lc.Published, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """What a publish says: where, which task, with what (Celery's ``argsrepr`` and
    ``kwargsrepr``: its own, possibly redacted, rendering), when due, until when."""
    detail: dict[str, Any] = {"queue": ev.queue}
    for key in ("task", "retries"):
        if key in metadata:
            detail[key] = metadata[key]
    headers = ev.message.get("headers")
    if isinstance(headers, Mapping):
        for key, header in (("args", "argsrepr"), ("kwargs", "kwargsrepr")):
            if headers.get(header) is not None:
                detail[key] = headers[header]
    for key in ("parent_id", "origin"):
        if key in metadata:
            detail[key] = metadata[key]
    if ev.not_before:
        detail["eta"] = iso_time(ev.not_before)
    if ev.expires:
        detail["expires"] = iso_time(ev.expires)
    if "retry_of" in metadata:
        detail["retry_of"] = metadata["retry_of"]
    return detail


def _result_summary(stored: Mapping[str, Any]) -> Any:
    """The task's return value when the backend stored JSON; else a size note.

    JSON is only parsed, never executed; any other encoding (pickle, msgpack)
    stays opaque: the store never decodes what it cannot read safely.
    """
    body = stored.get("body")
    if stored.get("encoding") == "utf-8" and isinstance(body, str):
        try:
            return json.loads(body).get("result")
        except (ValueError, AttributeError):
            pass
    return f"<{len(str(body))} bytes, {stored.get('encoding', 'opaque')}>"


def iso_time(ts: float) -> str:
    """Epoch seconds as ISO-8601 in UTC, to the millisecond: every time in JSON output."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


def format_timeline(entries: Sequence[Entry]) -> str:
    """A readable timeline: time, event, delivery number, worker and details."""
    lines = []
    for e in entries:
        when = datetime.fromtimestamp(e.time, timezone.utc).strftime("%H:%M:%S.%f")[:-3]
        delivery = f"#{e.delivery}" if e.delivery else ""
        parts = [f"{k}={_short(v)}" for k, v in e.detail.items()]
        if e.worker:
            parts.append(f"by {e.worker}")
        lines.append(f"{when}  {e.event:<14} {delivery:<3} {' '.join(parts)}".rstrip())
    return "\n".join(lines)


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class LogFollower:
    """New events of the whole log as they commit -- ``tail -f``.

    Positions are handed out when an event is inserted, not when its transaction
    commits, so on PostgreSQL a slow transaction (an application's, with an atomic
    publish in it) can commit an event *below* positions already read.  Reading
    only ``position > last`` would skip it.  The follower remembers the holes it
    has seen below its high-water mark and looks for them again on every poll; a
    hole still empty after ``gap_timeout`` seconds is taken for a rolled-back
    insert (a lost race, a rollback) and forgotten.  Late events come out late,
    not in log order.
    """

    def __init__(
        self, store: EventStore, after: int, *, gap_timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic, max_gaps: int = 100_000,
    ) -> None:
        self.store = store
        self.position = after
        self.gap_timeout = gap_timeout
        self.max_gaps = max_gaps
        self._clock = clock
        #: Missing position -> when it was first seen missing.
        self.gaps: dict[int, float] = {}

    def poll(self, limit: int = 1000) -> list[RecordedEvent]:
        """Events committed since the last poll: late ones first, then new ones."""
        now = self._clock()
        late: list[RecordedEvent] = []
        if self.gaps:
            late = self.store.read_positions(self.gaps)
            for rec in late:
                del self.gaps[rec.position]
            for position, since in list(self.gaps.items()):
                if now - since > self.gap_timeout:
                    del self.gaps[position]
        batch = self.store.read_all(after=self.position, limit=limit)
        expected = self.position + 1
        for rec in batch:
            for missing in range(expected, rec.position):
                if len(self.gaps) < self.max_gaps:
                    self.gaps[missing] = now
            expected = rec.position + 1
        if batch:
            self.position = batch[-1].position
        return late + batch
