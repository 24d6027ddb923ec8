"""Operations: what monitoring, operators and the result backend ask of the store.

Queue counts, dead letters, results, purge, retention (prune) and rebuilding the
derived tables from the log.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .. import lifecycle as lc
from ..exceptions import CorruptStream, InvalidTransition, UnreadableStream
from .database import Database
from .log import EventLog, Pending, decided, decode_json, evolve_all, fold
from .projection import project
from .records import DeadLetter, QueueStats, RecordedEvent, ScheduledMessage

logger = logging.getLogger(__name__)

#: ``progress(done, total)``: how a long operation reports how far it got.
Progress = Callable[[int, int], None]


class Operations:
    """Queue statistics, dead letters, results, purge, prune and rebuild."""

    def __init__(self, db: Database, log: EventLog) -> None:
        self.db = db
        self.log = log
        self.queries = log.queries

    def ping(self) -> None:
        """Check that the database answers and the schema is in place."""
        with self.db.read() as conn:
            conn.execute(self.queries.last_position).scalar()

    def maintenance_warnings(self) -> list[str]:
        """Database settings that will slow the store down (PostgreSQL's autovacuum
        switched off), each as a sentence for an operator; empty when all is well."""
        with self.db.read() as conn:
            return self.db.dialect.maintenance_warnings(conn)

    # -- queues --------------------------------------------------------------------

    def queue_size(self, queue: str) -> int:
        """Messages waiting in ``queue`` (ready or scheduled, not claimed)."""
        with self.db.read() as conn:
            return int(conn.execute(self.queries.queue_size, {"queue": queue}).scalar_one())

    def queue_stats(self) -> list[QueueStats]:
        """Ready, scheduled, claimed and dead counts per queue, and the oldest ages."""
        stats: dict[str, dict[str, Any]] = defaultdict(dict)
        with self.db.read() as conn:
            now = self.db.now()
            rows = conn.execute(self.queries.queue_states, {"now": now})
            for queue, kind, count, oldest, since, claimed_at in rows:
                stats[queue][kind] = count
                old = stats[queue].get("oldest_seq")
                stats[queue]["oldest_seq"] = oldest if old is None else min(old, oldest)
                if kind == "ready":
                    stats[queue]["oldest_ready_age"] = max(0.0, now - since)
                elif kind == "claimed":
                    stats[queue]["oldest_lease_age"] = max(0.0, now - claimed_at)
            for queue, count in conn.execute(self.queries.dead_counts):
                stats[queue]["dead"] = count
        return [QueueStats(queue=q, **v) for q, v in sorted(stats.items())]

    def scheduled(self, queues: Iterable[str], limit: int = 1000) -> list[ScheduledMessage]:
        """Messages of ``queues`` waiting for their ETA, soonest first."""
        wanted = sorted(set(queues))
        if not wanted:
            return []
        with self.db.read() as conn:
            rows = conn.execute(self.queries.scheduled_messages,
                                {"queues": wanted, "now": self.db.now(), "limit": limit})
            return [
                ScheduledMessage(r.stream_id, r.delivery_id, r.queue, r.priority, r.not_before,
                                 decode_json(r.data).get("message") or {})
                for r in rows
            ]

    def purge(self, queue: str, *, reason: str = "purged") -> int:
        """Discard every unclaimed message in ``queue``; returns how many.

        A message whose stream cannot be read is quarantined as a dead letter
        instead, as a claim would (not counted); one whose queue row the log
        does not bear out is left for ``check`` and ``rebuild``, and logged."""
        total = 0
        while True:
            discarded, moved = self.db.retrying(lambda: self._purge_batch(queue, reason))
            total += discarded
            if not (discarded or moved):
                return total

    def _purge_batch(self, queue: str, reason: str) -> tuple[int, int]:
        """One batch: how many messages it discarded, and how many streams it
        quarantined (their messages left the queue too)."""
        with self.db.write() as tx:
            rows = tx.conn.execute(self.queries.nominate_unclaimed, {"queue": queue}).all()
            streams = self.log.read_streams(tx, (r.stream_id for r in rows))
            states, unreadable = self.log.fold_readable(tx, streams)
            pending: Pending = []
            for delivery, stream in rows:
                if stream in unreadable:
                    continue
                try:
                    events = lc.decide(lc.Discard(delivery, reason), states[stream], tx.now)
                except InvalidTransition as error:
                    logger.error("purge of %r skipped a queue row the log does not bear out "
                                 "(run `celery-eventstore check`): %s", queue, error)
                    continue
                pending.append((states[stream], events, None))
                states[stream] = evolve_all(states[stream], events)
            self.log.append_pending(tx, decided(pending))
            return len(pending), len(unreadable)

    # -- dead letters ---------------------------------------------------------------

    def dead_letters(self, queue: str | None = None, limit: int = 1000) -> list[DeadLetter]:
        """Dead-lettered deliveries not published again, oldest first."""
        with self.db.read() as conn:
            rows = conn.execute(self.queries.dead_letters, {"queue": queue, "limit": limit})
            return [
                DeadLetter(r.delivery_id, r.stream_id, r.queue, r.reason, r.dead_at)
                for r in rows
            ]

    def retry_dead(self, delivery: str) -> str:
        """Publish a dead-lettered delivery again, as a new delivery on its stream."""
        with self.db.read() as conn:
            stream = conn.execute(
                self.queries.dead_letter_stream, {"delivery": delivery}
            ).scalar()
        if stream is None:
            raise InvalidTransition(f"no dead letter {delivery!r}")
        published = next(
            rec for rec in self.log.read_stream(stream)
            if isinstance(rec.event, lc.Published) and rec.event.delivery == delivery
        )
        original = published.event
        assert isinstance(original, lc.Published)
        new_delivery = uuid.uuid4().hex
        # Due now, but still bound by the task's own expiry (Celery's worker would
        # refuse an expired message anyway).  The history keeps what the first
        # publish said (task name, parent...), plus where this one comes from.
        self.log.execute(stream, lc.Publish(
            delivery=new_delivery,
            queue=original.queue,
            message=original.message,
            priority=original.priority,
            expires=original.expires,
            retry_of=delivery,
        ), metadata={**(published.metadata or {}), "retry_of": delivery})
        return new_delivery

    def purge_dead(self, queue: str | None = None) -> int:
        """Remove dead letters from the list (their history stays in the log)."""
        purged = 0
        for letter in self.dead_letters(queue):
            self.log.execute(letter.stream, lc.PurgeDeadLetter(letter.delivery))
            purged += 1
        return purged

    # -- results ---------------------------------------------------------------------

    def results(self, streams: Iterable[str]) -> dict[str, tuple[str, Any, float | None]]:
        """``stream -> (state, encoded result, date_done)`` for streams with a result."""
        wanted = sorted(set(streams))
        if not wanted:
            return {}
        with self.db.read() as conn:
            rows = conn.execute(self.queries.results, {"streams": wanted})
            return {r.stream_id: (r.state, r.result, r.date_done) for r in rows}

    def expire_results(self, before: float, *, batch: int = 500) -> int:
        """Expire the final results recorded before ``before`` (Celery's
        ``result_expires``): each gets a ``ResultExpired`` event and leaves the
        results table, so the backend reports it as unknown; its history stays.
        Returns how many were expired."""
        total = 0
        while done := self.db.retrying(lambda: self._expire_batch(before, batch)):
            total += done
        return total

    def _expire_batch(self, before: float, batch: int) -> int:
        with self.db.write() as tx:
            streams = list(tx.conn.execute(
                self.queries.expired_results, {"before": before, "limit": batch}
            ).scalars())
            states = self.log.load_all(tx, streams)
            pending = decided([
                (states[s], lc.decide(lc.ExpireResult(), states[s], tx.now), None)
                for s in streams
            ])
            self.log.append_pending(tx, pending)
            # Counted by what expired: a row nothing can expire would come back first
            # in every batch, and must end the loop rather than spin on it.
            return len(pending)

    # -- canvases ------------------------------------------------------------------------

    def streams_linked(self, link: str, value: str) -> list[str]:
        """Streams whose publish names ``value`` as its ``link``: Celery's ``root_id``
        (the tasks under a root other than itself) or ``group`` (a group's members).
        An index lookup, however long the log."""
        with self.db.read() as conn:
            rows = conn.execute(self.queries.streams_linked[link], {"value": value})
            return sorted(rows.scalars())

    # -- retention ---------------------------------------------------------------------

    def prune(
        self, before: float, *, batch: int = 500, progress: Progress | None = None,
        dry_run: bool = False,
    ) -> int:
        """Delete whole streams whose last event is older than ``before``; returns how many.
        With ``dry_run`` nothing is deleted: it returns how many would be.

        A stream with a message still pending (ready, scheduled or claimed) or a
        dead letter nobody retried or purged is kept.  Streams are taken in log
        order, ``batch`` at a time, each batch in a transaction of its own that
        reads and deletes only its streams (primary-key and stream index lookups),
        so it is short however long the log is, and locks nothing a worker claims
        or acks (on SQLite, whose writers take turns, it pauses between batches
        for waiting writers to get their turn).  ``progress(done, total)`` is
        called after each batch with the streams examined so far out of those that
        began before ``before``.
        """
        with self.db.read() as conn:
            total, upto = conn.execute(self.queries.old_part, {"before": before}).one()
        if upto is None:
            return 0
        pruned = examined = 0
        after = 0
        while True:
            after, candidates, doomed = self.db.retrying(
                functools.partial(self._prune_batch, before, after, upto, batch, dry_run)
            )
            if not candidates:
                return pruned
            pruned += doomed
            examined += candidates
            if progress is not None:
                progress(examined, max(int(total), examined))
            time.sleep(self.db.dialect.writer_pause)

    def _prune_batch(
        self, before: float, after: int, upto: int, batch: int, dry_run: bool = False
    ) -> tuple[int, int, int]:
        """``(last position examined, streams examined, streams deleted)``; with
        ``dry_run``, those that would be deleted."""
        if dry_run:
            with self.db.read() as conn:
                last, candidates, doomed, _ = self._prunable(conn, before, after, upto, batch)
                return last, len(candidates), len(doomed)
        with self.db.write() as tx:
            last, candidates, doomed, positions = self._prunable(
                tx.conn, before, after, upto, batch
            )
            if doomed:
                params = {
                    "streams": doomed,
                    "positions": [p for s in doomed for p in positions[s]],
                }
                for statement in self.queries.delete_streams:
                    tx.conn.execute(statement, params)
            return last, len(candidates), len(doomed)

    def _prunable(
        self, conn: Any, before: float, after: int, upto: int, batch: int
    ) -> tuple[int, list[str], list[str], dict[str, list[int]]]:
        """The next ``batch`` streams born before ``before`` after log position
        ``after`` (up to ``upto``): the last position examined, the candidates, those
        of them that may go, and the positions of their events."""
        q = self.queries
        born = conn.execute(
            q.old_streams, {"before": before, "after": after, "upto": upto, "limit": batch}
        ).all()
        if not born:
            return after, [], [], {}
        candidates = [stream for _, stream in born]
        positions: dict[str, list[int]] = defaultdict(list)
        keep: set[str] = set()
        for stream, position, recorded_at in conn.execute(
            q.stream_events, {"streams": candidates}
        ):
            positions[stream].append(position)
            if recorded_at >= before:
                keep.add(stream)
        # Pending messages and unhandled dead letters keep their stream.
        keep |= set(conn.execute(q.pending_streams, {"streams": candidates}).scalars())
        doomed = [s for s in candidates if s not in keep]
        return born[-1].position, candidates, doomed, positions

    # -- projections -----------------------------------------------------------------

    def rebuild(
        self,
        *,
        batch_streams: int = 1000,
        progress: Progress | None = None,
        on_unreadable: Callable[[UnreadableStream], None] | None = None,
    ) -> int:
        """Empty every derived table and replay the log into it; returns events replayed.

        Writers wait for the rebuild (it holds the log against appends), readers do not.
        ``progress(done, total)`` is called with the events replayed so far.  A stream
        that cannot be read is reported to ``on_unreadable`` and replayed as far as it
        can be: its messages still queued are quarantined first, then it is rebuilt
        from its events before the bad one, and its quarantine records.
        """
        tables = self.queries.tables
        replayed = total = 0
        with self.db.write() as tx:
            conn = tx.conn
            self.db.dialect.lock_log(conn, tables.events)
            for error, version in self._scan_unreadable(conn):
                self.log.quarantine(tx, error, version)
            if progress is not None:
                total = int(conn.execute(self.queries.count_events).scalar_one())
            for table in tables.projections:
                table.create(conn, checkfirst=True)  # it may have been dropped
            for statement in self.queries.empty_projections:
                conn.execute(statement)
            batch: list[RecordedEvent] = []
            states: dict[str, lc.JobState] = {}
            for stream, recs in self._streams(conn):
                if len(states) >= batch_streams:
                    project(conn, self.queries, batch, states)
                    batch, states = [], {}
                    if progress is not None:
                        progress(replayed, total)
                replayable, states[stream] = _replayable(stream, recs, on_unreadable)
                batch.extend(replayable)
                replayed += len(recs)
            project(conn, self.queries, batch, states)
            if progress is not None:
                progress(replayed, total)
        return replayed

    def unreadable_streams(self) -> list[UnreadableStream]:
        """Every stream holding an event that cannot be read, with the first bad
        position and why (a scan of the whole log)."""
        with self.db.read(streaming=True) as conn:
            return [error for error, _ in self._scan_unreadable(conn)]

    def _scan_unreadable(self, conn: Any) -> list[tuple[UnreadableStream, int]]:
        found = []
        for stream, recs in self._streams(conn):
            try:
                fold(stream, recs)
            except UnreadableStream as error:
                found.append((error, max(r.version for r in recs)))
            except CorruptStream as error:  # readable, but not a sequence it can fold
                first = UnreadableStream(stream, recs[0].position, str(error))
                found.append((first, max(r.version for r in recs)))
        return found

    def _streams(self, conn: Any) -> Iterator[tuple[str, list[RecordedEvent]]]:
        """The whole log, one stream at a time."""
        rows = conn.execute(self.queries.every_stream.execution_options(yield_per=5000))
        records = (self.log.recorded(row) for row in rows)
        for stream, recs in itertools.groupby(records, key=lambda r: r.stream):
            yield stream, list(recs)

    def projection_rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every derived table, sorted: for comparing a rebuild."""
        with self.db.read() as conn:
            return {
                table.name: [tuple(r) for r in conn.execute(self.queries.every_row(table))]
                for table in self.queries.tables.projections
            }


def _replayable(
    stream: str,
    recs: list[RecordedEvent],
    on_unreadable: Callable[[UnreadableStream], None] | None,
) -> tuple[list[RecordedEvent], lc.JobState]:
    """The records a rebuild projects for one stream, and the state they fold to:
    all of them, or, for a stream that cannot be read, those before the bad one and
    its quarantine records."""
    try:
        return recs, fold(stream, recs)
    except CorruptStream as error:
        if on_unreadable is not None:
            on_unreadable(
                error if isinstance(error, UnreadableStream)
                else UnreadableStream(stream, recs[0].position, str(error))
            )
    prefix: list[RecordedEvent] = []
    for rec in recs:
        if rec.version != len(prefix) + 1 or isinstance(rec.event, lc.Unreadable):
            break
        prefix.append(rec)
    try:
        state = fold(stream, prefix)
    except CorruptStream:
        prefix, state = [], lc.fold(stream, ())
    quarantined = [r for r in recs[len(prefix):] if isinstance(r.event, lc.Quarantined)]
    return prefix + quarantined, state
