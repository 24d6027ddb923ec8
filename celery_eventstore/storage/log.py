"""The event log: reading streams, appending decisions, and commands on one stream.

Every write follows one path: read the streams involved, fold them
(:func:`~celery_eventstore.lifecycle.fold`), ask
:func:`~celery_eventstore.lifecycle.decide` for the events, append them at the
next versions -- the unique ``(stream_id, version)`` key makes the loser of any
race fail -- and update the projections and send the wake-ups in the same
transaction.  A lost race is retried from a fresh read; the caller never sees
it unless it asked for an explicit expected version.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from .. import lifecycle as lc
from ..exceptions import ConcurrencyConflict, CorruptStream, UnreadableStream
from .chords import chord_snapshot, rewrite_chord
from .database import Database, Tx
from .execution import execute_rows
from .notifiers import Channels, Notifier, ReadyThrottle
from .projection import project
from .queries import Queries
from .records import LogFilter, RecordedEvent
from .set_writes import SetWrites
from .single_append import POSITIONED, STATEMENT_TIME, SingleAppend
from .single_publish import derived_rows, publish_parameters, publish_statement, recorded_after

logger = logging.getLogger(__name__)

#: Decisions made but not appended yet: the state each was decided on, its
#: events and their metadata.
Pending = list[tuple[lc.JobState, Sequence[lc.Event], Mapping[str, Any] | None]]

#: A day, the unit of ``born``.
SECONDS_PER_DAY = 86400

#: Events whose projection records their log position.
_POSITIONED = (lc.Published, lc.DeadLettered, lc.Quarantined)

#: Events a result waiter may be waiting for.
_FINISHING = (
    lc.Succeeded, lc.Failed, lc.Revoked, lc.Discarded, lc.DeadLettered, lc.GroupSaved
)


class EventLog:
    """Reads and appends events; keeps the projections and wake-ups in step."""

    def __init__(
        self, db: Database, queries: Queries, notifier: Notifier, channels: Channels
    ) -> None:
        self.db = db
        self.queries = queries
        self.notifier = notifier
        self.channels = channels
        self.throttle = ReadyThrottle(self._notify_ready) if notifier.sends else None
        clock = db.dialect.clock_expression()
        #: One publish to a new stream in one statement, without and with its
        #: wake-up (None where the database cannot: see :mod:`.single_publish`).
        self._single_publish: tuple[Any, Any] | None = None
        if clock is not None:
            self._single_publish = (
                publish_statement(queries, clock, None),
                publish_statement(queries, clock, notifier.expression)
                if notifier.sends else None,
            )
        #: One event after a read, with its derived rows and wake-up, in one
        #: statement (None where the database cannot: see :mod:`.single_append`).
        self._single_append = (
            SingleAppend(queries, notifier.expression if notifier.sends else None, clock)
            if db.dialect.writes_in_with else None
        )
        #: A round's events and their derived rows in one statement, without
        #: their positions (None where the database cannot: see :mod:`.set_writes`).
        self._set_writes = (
            SetWrites(queries, db.dialect) if db.dialect.writes_in_with else None
        )
        #: The log is partitioned by birth day (found when the schema is checked):
        #: writers then hold their streams against a prune moving them (see
        #: :meth:`hold_streams`).
        self.partitioned = False

    def close(self) -> None:
        """Send the wake-ups a window still holds and end the thread that sends them."""
        if self.throttle is not None:
            self.throttle.close()

    # -- reading ---------------------------------------------------------------

    def recorded(self, row: Any) -> RecordedEvent:
        """A row of the log as a record; a row that cannot be decoded becomes an
        :class:`~celery_eventstore.lifecycle.Unreadable` event, so one bad row never
        stops a read of many (folding its stream fails, with the position)."""
        metadata = None
        try:
            event = lc.event_from(row.type, decode_json(row.data))
            metadata = decode_json(row.metadata)
        except (ValueError, CorruptStream) as exc:
            event = lc.Unreadable(type=str(row.type), reason=str(exc).splitlines()[0][:200])
        return RecordedEvent(
            position=row.position,
            stream=row.stream_id,
            version=row.version,
            event=event,
            metadata=metadata if isinstance(metadata, Mapping) else None,
            recorded_at=row.recorded_at,
            born=getattr(row, "born", None),
        )

    def recorded_publish(self, row: Any) -> tuple[RecordedEvent, Any] | None:
        """A publish as a claim's nomination returns it, with its body: the
        event as a decision reads it (body None, no metadata) and the body.  None
        for a row that does not decode: a read of its stream says what it is."""
        try:
            data = decode_json(row.data)
            if row.type != "Published" or not isinstance(data, dict):
                return None
            event = lc.event_from(row.type, {**data, "message": None})
        except (ValueError, TypeError, CorruptStream):
            return None
        recorded = RecordedEvent(
            position=row.position, stream=row.stream_id, version=row.version, event=event,
            metadata=None, recorded_at=row.recorded_at, born=row.born,
        )
        return recorded, data.get("message")

    def read_streams(
        self, conn: sa.Connection | Tx, streams: Iterable[str], *, bodies: bool = False,
        hold: bool = True, after: Mapping[str, int] | None = None,
    ) -> dict[str, list[RecordedEvent]]:
        """Every event of ``streams``; without ``bodies``, as a decision reads
        them: message bodies ``None`` and no metadata (see ``Queries.read_streams``).
        Given a write transaction still without its clock, the read brings it.
        ``hold``: the read is for a write (the default), so on a partitioned log
        the streams are held first.  ``after`` (stream -> version; without
        ``bodies``): of those streams, only the events after that version -- the
        tail past a state the caller holds."""
        wanted = sorted(set(streams))
        found: dict[str, list[RecordedEvent]] = {s: [] for s in wanted}
        if not wanted:
            return found
        if hold:
            self.hold_streams(conn.conn if isinstance(conn, Tx) else conn, wanted)
        after = {s: v for s, v in (after or {}).items() if s in found}
        tails = {"known": sorted(after), "after": min(after.values(), default=0)}
        if bodies:
            assert isinstance(conn, sa.Connection) and not after
            rows = conn.execute(self.queries.read_streams_whole, {"streams": wanted})
        elif isinstance(conn, Tx):
            rows = conn.conn.execute(
                self.queries.read_streams,
                {"streams": wanted, "relaxed": conn.relaxed, **tails},
            )
        else:
            rows = conn.execute(self.queries.read_streams, {"streams": wanted, **tails})
        clock_wanted = isinstance(conn, Tx) and conn.clock_wanted
        for row in rows.all():  # one fetch, not one driver call per row
            if clock_wanted and row.tx_clock is not None:
                assert isinstance(conn, Tx)
                conn.clock_read(float(row.tx_clock))
                clock_wanted = False
            if row.version > after.get(row.stream_id, 0):  # the query's ``after`` is the lowest
                found[row.stream_id].append(self.recorded(row))
        return found

    def task_names(self, streams: Iterable[str]) -> dict[str, str]:
        """The task name each stream's first publish recorded (streams without one
        are left out)."""
        wanted = sorted(set(streams))
        names: dict[str, str] = {}
        if not wanted:
            return names
        with self.db.read() as conn:
            for row in conn.execute(self.queries.read_publishes, {"streams": wanted}):
                metadata = self.recorded(row).metadata or {}
                if row.stream_id not in names and isinstance(metadata.get("task"), str):
                    names[row.stream_id] = metadata["task"]
        return names

    def load_all(
        self, conn: sa.Connection | Tx, streams: Iterable[str]
    ) -> dict[str, lc.JobState]:
        return {s: fold(s, recs) for s, recs in self.read_streams(conn, streams).items()}

    def read_stream(self, stream: str) -> list[RecordedEvent]:
        """Every event of one stream, oldest first."""
        with self.db.read() as conn:
            return self.read_streams(conn, [stream], bodies=True, hold=False)[stream]

    def load(self, stream: str) -> lc.JobState:
        """One stream folded into its current state."""
        with self.db.read() as conn:
            return fold(stream, self.read_streams(conn, [stream], hold=False)[stream])

    def read_all(self, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        """Events of every stream with a position above ``after``, in log order."""
        with self.db.read() as conn:
            rows = conn.execute(self.queries.read_after, {"after": after, "limit": limit})
            return [self.recorded(row) for row in rows]

    def read_positions(self, positions: Iterable[int]) -> list[RecordedEvent]:
        """The events at these log positions that exist (are committed) now."""
        wanted = sorted(set(positions))
        if not wanted:
            return []
        with self.db.read() as conn:
            rows = conn.execute(self.queries.read_positions, {"positions": wanted})
            return [self.recorded(row) for row in rows]

    def read_log(
        self, where: LogFilter, *, after: int = 0, before: int | None = None,
        limit: int = 1000, newest_first: bool = False,
    ) -> list[RecordedEvent]:
        """Events matching ``where`` between positions ``after`` and ``before``
        (exclusive), oldest first or newest first.  A time bound narrows the
        positions first (an index lookup), so a read near the end of a long log
        never walks the log from its start."""
        given = where.given()
        if "types" in given:
            given["types"] = list(given["types"])
        with self.db.read() as conn:
            if where.since is not None:
                first = conn.execute(
                    self.queries.first_position_since, {"since": where.since}
                ).scalar()
                if first is None:
                    return []
                after = max(after, first - 1)
            if where.until is not None:
                last = conn.execute(
                    self.queries.last_position_until, {"until": where.until}
                ).scalar()
                if last is None:
                    return []
                before = last + 1 if before is None else min(before, last + 1)
            if before is not None:
                given["before"] = before
            statement = self.queries.log_page(tuple(sorted(given)), newest_first)
            rows = conn.execute(statement, {**given, "after": after, "limit": limit})
            return [self.recorded(row) for row in rows]

    def hold_streams(self, conn: sa.Connection, streams: Sequence[str]) -> None:
        """On a partitioned log, keep a prune from moving ``streams`` to another
        partition until this transaction ends (a shared lock per stream, which
        writers never wait for among themselves): an append must go to the
        partition its read found the stream in, or ``(stream_id, version, born)``
        would let two appends of one version in."""
        if self.partitioned:
            self.db.dialect.lock_streams(conn, self.move_keys(streams), shared=True)

    def move_keys(self, streams: Iterable[str]) -> list[str]:
        """The lock names that guard ``streams`` against a move."""
        return [f"{self.channels.namespace}moving:{s}" for s in streams]

    def last_position(self) -> int:
        """The log's highest position (0 when it is empty)."""
        with self.db.read() as conn:
            return int(conn.execute(self.queries.last_position).scalar() or 0)

    # -- appending -------------------------------------------------------------

    def append_pending(
        self, tx: Tx, pending: Pending, *, read_positions: bool = True,
        folded: Mapping[str, lc.JobState] | None = None,
    ) -> tuple[list[RecordedEvent], dict[str, lc.JobState]]:
        """Append each stream's events after the state it was decided on, project
        them and wake whoever waits for them, in ``tx``.

        ``read_positions=False`` (claims, acks, renewals, whose records never leave
        the store) skips reading back the log positions -- a RETURNING costs about a
        third of the insert -- unless an event's projection needs its position.
        Such records carry position 0.  ``folded``: each stream's state after all
        of its pending events, where the caller has folded them already (a batch
        chains its decisions on one stream), so they are not folded twice.
        """
        rows, events, states = _rows(pending, tx.now, folded)
        if not rows:
            return [], states
        positions: Sequence[int]
        numbered = read_positions or any(isinstance(e, POSITIONED) for e in events)
        if numbered:
            positions = self.db.dialect.insert_numbered(
                tx.conn, self.queries.append_returning, self.queries.append, rows
            )
        else:
            positions = [0] * len(rows)
        recorded = [
            RecordedEvent(
                position=pos,
                stream=row["stream_id"],
                version=row["version"],
                event=event,
                metadata=row["metadata"],
                recorded_at=row["recorded_at"],
            )
            for pos, row, event in zip(positions, rows, events, strict=True)
        ]
        together = (
            None if numbered or self._set_writes is None
            else self._set_writes.prepare(rows, recorded, states)
        )
        if together is not None:  # the events and their derived rows at once
            tx.conn.execute(*together)
        else:
            if not numbered:
                execute_rows(tx.conn, self.queries.append, rows)
            project(tx.conn, self.queries, recorded, states)
        self._wake(tx, recorded, states)
        tx.appended.extend(recorded)
        return recorded, states

    @property
    def publishes_new(self) -> bool:
        """Whether :meth:`publish_new` can send a publish in one statement here."""
        return self._single_publish is not None

    def publish_new(
        self, tx: Tx, stream: str, events: Sequence[lc.Event],
        metadata: Mapping[str, Any] | None,
    ) -> list[RecordedEvent] | None:
        """Append ``events`` -- a publish's, decided on ``stream`` holding no
        events -- with its derived rows and its wake-up in one statement, in
        ``tx``; None (nothing sent) where that cannot be done, and
        :class:`ConcurrencyConflict` if the stream has events after all."""
        if self._single_publish is None or len(events) != 1:
            return None
        (event,) = events
        if not isinstance(event, lc.Published):
            return None
        state = lc.evolve(fold(stream, ()), event)
        row = _event_row(stream, 1, event, metadata, 0.0, 0)  # time and day: the statement's
        derived = derived_rows(
            self.queries, recorded_after(row, event, 0, 0.0), {stream: state}
        )
        if derived is None:
            return None
        params = publish_parameters(row, *derived, now=self.db.injected_now())
        ready = newly_queued([recorded_after(row, event, 0, 0.0)], {stream: state})
        if ready and self.throttle is not None and tx.after_commit is not None:
            ready, held = self.throttle.now(ready)
            if held:
                tx.after_commit.append(lambda: self.throttle.later(held))  # type: ignore[union-attr]
        without_wakeup, with_wakeup = self._single_publish
        statement = without_wakeup
        if ready and with_wakeup is not None:
            statement = with_wakeup
            params.update(channel=self.channels.ready, queue=next(iter(ready)))
        position, recorded_at = tx.conn.execute(statement, params).one()[:2]
        recorded = [recorded_after(row, event, position, recorded_at)]
        tx.appended.extend(recorded)
        return recorded

    def append_decided(
        self, tx: Tx, state: lc.JobState, events: Sequence[lc.Event],
        metadata: Mapping[str, Any] | None,
    ) -> list[RecordedEvent]:
        """Append ``events``, decided on ``state``, as :meth:`append_pending`
        does; where the database can take it and they wake no consumer, in one
        statement with their derived rows and their result wake-up."""
        single = self._one_statement(tx, state, events, metadata)
        if single is None:
            return self.append_pending(tx, [(state, events, metadata)])[0]
        return single()

    def _one_statement(
        self, tx: Tx, state: lc.JobState, events: Sequence[lc.Event],
        metadata: Mapping[str, Any] | None,
    ) -> Callable[[], list[RecordedEvent]] | None:
        """The append of ``events`` as one statement in ``tx``, ready to run, or
        None where one statement cannot carry it (see :meth:`append_decided`)."""
        if self._single_append is None or not events:
            return None
        rows, _, states = _rows([(state, events, metadata)], tx.now)
        recorded = [
            RecordedEvent(position=0, stream=state.stream, version=row["version"], event=event,
                          metadata=row["metadata"], recorded_at=row["recorded_at"])
            for row, event in zip(rows, events, strict=True)
        ]
        wake = (self.channels.result(state.stream) if self.notifier.sends
                and any(isinstance(e, _FINISHING) for e in events) else None)
        prepared = (
            None if newly_queued(recorded, states)
            else self._single_append.prepare(rows, recorded, states, wake)
        )
        if prepared is None:
            return None

        def run() -> list[RecordedEvent]:
            positions = tx.conn.execute(*prepared).one()[:len(rows)]
            appended = [dataclasses.replace(r, position=p)
                        for r, p in zip(recorded, positions, strict=True)]
            tx.appended.extend(appended)
            return appended

        return run

    def _wake(
        self, tx: Tx, recorded: Sequence[RecordedEvent], states: Mapping[str, lc.JobState]
    ) -> None:
        ready = newly_queued(recorded, states)
        if ready and self.throttle is not None and tx.after_commit is not None:
            ready, held = self.throttle.now(ready)
            if held:
                tx.after_commit.append(lambda: self.throttle.later(held))  # type: ignore[union-attr]
        if ready:
            self.notifier.send(tx.conn, self.channels.ready, ready)
        for stream in sorted({r.stream for r in recorded if isinstance(r.event, _FINISHING)}):
            self.notifier.send(tx.conn, self.channels.result(stream), [stream])

    def _notify_ready(self, queues: set[str]) -> None:
        """Send the "ready" wake-ups a window held back, each a statement that
        commits by itself (nothing to keep together)."""
        with self.db.one_statement() as tx:
            self.notifier.send(tx.conn, self.channels.ready, queues)

    def fold_readable(
        self, tx: Tx, streams: Mapping[str, Sequence[RecordedEvent]],
        known: Mapping[str, lc.JobState] | None = None,
    ) -> tuple[dict[str, lc.JobState], set[str]]:
        """Fold each stream (carry a ``known`` state on by its tail); quarantine
        those that cannot be read, in ``tx``, so one bad row costs its own
        messages and never stops a queue.  Returns the states and the streams
        quarantined."""
        states: dict[str, lc.JobState] = {}
        unreadable: set[str] = set()
        for stream, recs in streams.items():
            try:
                held = (known or {}).get(stream)
                states[stream] = fold(stream, recs) if held is None else fold_on(held, recs)
            except UnreadableStream as error:
                logger.error("quarantined: %s", error)
                self.quarantine(
                    tx, error,
                    max((r.version for r in recs), default=0),
                    max((r.recorded_at for r in recs), default=0.0),
                )
                unreadable.add(stream)
        return states, unreadable

    def quarantine(
        self, tx: Tx, error: UnreadableStream, version: int, after: float = 0.0
    ) -> list[RecordedEvent]:
        """Take an unreadable stream's messages out of the queue as dead letters,
        recording why (``Quarantined``) after its last ``version``, recorded at
        ``after`` (its last event's time) or later."""
        pending = tx.conn.execute(
            self.queries.pending_of_stream, {"stream": error.stream}
        ).all()
        events = [lc.Quarantined(delivery, queue, str(error)) for delivery, queue in pending]
        if not events:
            return []
        versions = [version + offset for offset in range(1, len(events) + 1)]
        at = max(tx.now, after)
        born = tx.conn.execute(self.queries.stream_born, {"stream": error.stream}).scalar()
        rows = [
            _event_row(error.stream, v, event, None, at, birth_day(at) if born is None else born)
            for v, event in zip(versions, events, strict=True)
        ]
        positions = tx.conn.execute(self.queries.append_returning, rows).scalars().all()
        recorded = [
            RecordedEvent(pos, error.stream, v, event, None, at)
            for pos, v, event in zip(positions, versions, events, strict=True)
        ]
        project(tx.conn, self.queries, recorded, {})
        self.notifier.send(tx.conn, self.channels.result(error.stream), [error.stream])
        tx.appended.extend(recorded)
        return recorded

    def append(
        self,
        stream: str,
        events: Sequence[lc.Event],
        expected_version: int,
        *,
        metadata: Mapping[str, Any] | None = None,
        connection: sa.Connection | None = None,
    ) -> list[RecordedEvent]:
        """Append ``events`` to ``stream`` if it is at ``expected_version``.

        Raises :class:`ConcurrencyConflict` when the stream moved on, and
        :class:`CorruptStream` when the events do not follow from the stream.
        """
        try:
            with self.db.write(connection) as tx:
                state = self.load_all(tx, [stream])[stream]
                if state.version != expected_version:
                    raise ConcurrencyConflict(
                        f"stream {stream!r} is at version {state.version}, "
                        f"not {expected_version}"
                    )
                return self.append_pending(tx, [(state, events, metadata)])[0]
        except ConcurrencyConflict as exc:
            if exc.__cause__ is None:
                raise
            raise ConcurrencyConflict(
                f"stream {stream!r} moved past version {expected_version}"
            ) from None

    def execute(
        self,
        stream: str,
        command: lc.Command,
        *,
        metadata: Mapping[str, Any] | None = None,
        connection: sa.Connection | None = None,
        known: lc.JobState | None = None,
    ) -> list[RecordedEvent]:
        """Decide ``command`` on the stream's current state and append the result.

        Lost races are retried from a fresh read; an illegal command raises
        :class:`~celery_eventstore.exceptions.InvalidTransition`.  ``known``:
        the stream's state as a claim of it left it (a worker's result write),
        decided on without a read where it can be (see :meth:`_execute_known`).
        """
        durable = not isinstance(command, (lc.Start, lc.UpdateState))
        if (
            connection is None and durable and self._single_append is not None
            and self.db.one_statement_commits and not self.partitioned
            and lc.stream_kind(stream) is lc.StreamKind.TASK
        ):
            if known is not None and known.stream == stream:
                try:
                    appended = self._execute_known(command, known, metadata)
                except ConcurrencyConflict:
                    appended = None  # the stream moved on since: read it
                if appended is not None:
                    return appended
            return self.db.retrying(lambda: self._execute_apart(stream, command, metadata))

        def attempt() -> list[RecordedEvent]:
            with self.db.write(connection, durable=durable) as tx:
                if lc.stream_kind(stream) is lc.StreamKind.CHORD:  # many writers, one stream
                    self.db.dialect.lock_stream(tx.conn, self.channels.namespace + stream)
                if isinstance(command, lc.CountChordPart):
                    self.hold_streams(tx.conn, [stream])  # its snapshot reads no stream
                    state = self._chord_state(tx.conn, stream, command.task_id)
                else:
                    state = self.load_all(tx, [stream])[stream]
                events = lc.decide(command, state, tx.now)
                return self.append_decided(tx, state, events, metadata)

        return self.db.retrying(attempt)

    def _execute_apart(
        self, stream: str, command: lc.Command, metadata: Mapping[str, Any] | None
    ) -> list[RecordedEvent]:
        """A durable command on one task's stream as a read and a write that each
        commit as they run, with no BEGIN or COMMIT round trip: nothing is held
        between them, and a write that lands after another writer's loses on the
        ``(stream, version)`` key and is tried again from a fresh read, as in any
        race.  A write one statement cannot carry takes a transaction of its own,
        decided on the same read."""
        with self.db.one_statement() as tx:
            state = self.load_all(tx, [stream])[stream]
            events = lc.decide(command, state, tx.now)
            if not events:
                return []
            single = self._one_statement(tx, state, events, metadata)
            if single is not None:
                return single()
            now = tx.now
        with self.db.write() as tx:
            tx.clock_read(now)
            return self.append_pending(tx, [(state, events, metadata)])[0]

    def _execute_known(
        self, command: lc.Command, known: lc.JobState, metadata: Mapping[str, Any] | None
    ) -> list[RecordedEvent] | None:
        """A worker's result write decided on ``known`` -- its stream's state as
        the worker's claim left it -- and appended in one statement, with no read.

        The decision needs no clock (:data:`~.lifecycle.CLOCKLESS_RESULT_WRITES`),
        and the statement takes the time itself.  The events go after those
        appended since ``known`` if all of those are result-neutral (the
        worker's early ack, lease renewals: the decision is the same after
        them); after anything else (a takeover, a revoke, a retry's publish)
        they go after ``known``'s version, lose on the ``(stream, version)``
        key, and :class:`ConcurrencyConflict` sends the caller to a read.  None
        where this cannot be done in one statement, or decides nothing (which a
        read then confirms)."""
        if (not isinstance(command, lc.CLOCKLESS_RESULT_WRITES) or known.version == 0
                or known.born is None or self._single_append is None):
            return None
        events = lc.decide(command, known, STATEMENT_TIME)
        if not events:
            return None
        rows = _stream_rows(known, events, metadata, STATEMENT_TIME, known.born)
        state = lc.replace(evolve_all(known, events), recorded_until=STATEMENT_TIME)
        recorded = [
            RecordedEvent(position=0, stream=known.stream, version=row["version"], event=event,
                          metadata=row["metadata"], recorded_at=STATEMENT_TIME, born=known.born)
            for row, event in zip(rows, events, strict=True)
        ]
        if newly_queued(recorded, {known.stream: state}):
            return None
        wake = (self.channels.result(known.stream) if self.notifier.sends
                and any(isinstance(e, _FINISHING) for e in events) else None)
        prepared = self._single_append.prepare(
            rows, recorded, {known.stream: state}, wake,
            decided_at=known, now=self.db.injected_now(),
        )
        if prepared is None:
            return None
        with self.db.one_statement() as tx:
            row = tx.conn.execute(*prepared).one()
            recorded_at, shift = float(row[len(rows)]), int(row[len(rows) + 1])
            appended = [
                dataclasses.replace(r, position=p, recorded_at=recorded_at,
                                    version=r.version + shift)
                for r, p in zip(recorded, row[:len(rows)], strict=True)
            ]
            tx.appended.extend(appended)
        return appended

    def _chord_state(self, conn: sa.Connection, stream: str, task_id: str) -> lc.JobState:
        """A chord's state from its read model (a few rows whatever its size), or
        folded from its stream when the read model lags the log -- then the read
        model is written anew, so that happens once per chord."""
        snapshot = chord_snapshot(conn, self.queries, stream, task_id)
        if snapshot is not None:
            return snapshot
        state = self.load_all(conn, [stream])[stream]
        assert isinstance(state, lc.ChordState)
        rewrite_chord(conn, self.queries, state)
        return state


def fold(stream: str, recorded: Sequence[RecordedEvent]) -> lc.JobState:
    """A stream's state from its events, which must be readable and numbered 1, 2, 3...

    Raises :class:`UnreadableStream` naming the first bad row's position.
    """
    _check_readable(stream, recorded, after=0)
    state = lc.fold(stream, (rec.event for rec in recorded))
    if recorded:
        state = lc.replace(
            state, recorded_until=max(rec.recorded_at for rec in recorded),
            born=recorded[0].born,
        )
    return state


def fold_on(state: lc.JobState, tail: Sequence[RecordedEvent]) -> lc.JobState:
    """A state held up to its version, carried on by the stream's events after
    it (numbered on from it): what :func:`fold` of the whole stream gives.

    Raises :class:`UnreadableStream` as :func:`fold` does."""
    _check_readable(state.stream, tail, after=state.version)
    if not tail:
        return state
    return lc.replace(
        evolve_all(state, (rec.event for rec in tail)),
        recorded_until=max(state.recorded_until, *(rec.recorded_at for rec in tail)),
    )


def _check_readable(stream: str, recorded: Sequence[RecordedEvent], *, after: int) -> None:
    """Raise :class:`UnreadableStream` at the first row that is not the next
    version (numbered on from ``after``) or cannot be read."""
    for expected, rec in enumerate(recorded, start=after + 1):
        if rec.version != expected:
            raise UnreadableStream(
                stream, rec.position, f"version {rec.version} follows {expected - 1}"
            )
        if isinstance(rec.event, lc.Unreadable):
            raise UnreadableStream(stream, rec.position, rec.event.reason)


def decode_json(value: Any) -> Any:
    """A JSON column's value: drivers decode PostgreSQL's jsonb, SQLite gives text."""
    return json.loads(value) if isinstance(value, (str, bytes)) else value


def evolve_all(state: lc.JobState, events: Iterable[lc.Event]) -> lc.JobState:
    for event in events:
        state = lc.evolve(state, event)
    return state


def decided(pending: Pending) -> Pending:
    """Drop empty decisions; the states already chain within a stream."""
    return [p for p in pending if p[1]]


def newly_queued(recorded: Iterable[RecordedEvent], states: Mapping[str, lc.JobState]) -> set[str]:
    """Queues that got a message to claim, now or at its ETA: worth waking
    consumers for -- to claim it, or to set their timer for when it is due."""
    queued: set[str] = set()
    for rec in recorded:
        ev = rec.event
        if isinstance(ev, (lc.Published, lc.Requeued)):
            delivery = states[rec.stream].delivery(ev.delivery)
            if not delivery.status.is_final:
                queued.add(delivery.queue)
    return queued


def _rows(
    pending: Pending, now: float, folded: Mapping[str, lc.JobState] | None = None
) -> tuple[list[dict[str, Any]], list[lc.Event], dict[str, lc.JobState]]:
    """The event rows to insert, their events, and each stream's state after them
    (``folded``'s, where given)."""
    rows: list[dict[str, Any]] = []
    events: list[lc.Event] = []
    states: dict[str, lc.JobState] = {}
    for state, decided_events, metadata in pending:
        at = recorded_time(state, now)
        born = birth_day(at) if state.born is None else state.born
        rows += _stream_rows(state, decided_events, metadata, at, born)
        events.extend(decided_events)
        after = evolve_all(state, decided_events) if folded is None else folded[state.stream]
        states[state.stream] = lc.replace(after, recorded_until=at, born=born)
    return rows, events, states


def _stream_rows(
    state: lc.JobState, events: Sequence[lc.Event], metadata: Mapping[str, Any] | None,
    at: float, born: int,
) -> list[dict[str, Any]]:
    """The log rows of ``events``, appended to ``state``'s stream after its version."""
    return [
        _event_row(state.stream, state.version + offset, event, metadata, at, born)
        for offset, event in enumerate(events, start=1)
    ]


def recorded_time(state: lc.JobState, now: float) -> float:
    """The time to record a stream's next events at: the transaction's, unless
    the stream already holds a later one.

    A transaction reads the clock first and the stream later, so one that was
    slow in between can append after an event of a transaction that read the
    clock after it; a host's clock (SQLite) can also be stepped back.  A
    stream's recorded times never run backwards.
    """
    return max(now, state.recorded_until)


def birth_day(at: float) -> int:
    """The day (since the epoch, UTC) of a time: a new stream's ``born``."""
    return int(at // SECONDS_PER_DAY)


def _event_row(
    stream: str, version: int, event: lc.Event, metadata: Mapping[str, Any] | None,
    now: float, born: int,
) -> dict[str, Any]:
    """The log row of one event."""
    return {
        "born": born,
        "stream_id": stream,
        "version": version,
        "type": lc.event_type(event),
        "data": lc.event_data(event),
        "metadata": dict(metadata) if metadata else None,
        "recorded_at": now,
    }
