"""The event store's tables as the code reads and writes them: the latest schema.

This module describes only the latest version.  How a database gets there is the
frozen migrations' job (:mod:`.migrations`, one module per version); a change here
needs a new migration and a bumped :data:`SCHEMA_VERSION`, and the migration tests
fail until migrating from nothing creates exactly these tables.

``events`` is the log and the only source of truth.  Every other table is a
projection of it, written in the same transaction as the append and rebuildable
from the log at any time:

* ``messages`` -- the hot queue: one row per delivery that is not settled yet
  (ready, scheduled or claimed).  Settled deliveries leave it, so a claim is an
  index lookup on a small table however long the history grows.
* ``dead_letters`` -- deliveries that were dead-lettered and not retried.
* ``results`` -- each task's (or group's) latest result state, for the result
  backend: one indexed read per ``AsyncResult``, however long the stream.
* ``chords`` and ``chord_parts`` -- each chord stream's version, count and
  completion, and the header tasks it counted: counting a part reads one row of
  each, not the chord's whole stream, so the ten-thousandth part costs what the
  first did.

Routing state is kept apart from history.  ``queues``, ``bindings`` and
``transient_messages`` hold what Celery's control plane needs across processes
(queue declarations, exchange bindings, broadcast and reply messages).  They are
volatile by design, like Redis pub/sub: re-declared by every client when it
connects, swept when their queues expire, and never written to the log, so
``celery inspect`` and worker heartbeats do not bloat the audit history.

``schema_version`` records which versions ran; it is bookkeeping, not state.
Every name carries the configured prefix and, on PostgreSQL, the schema.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

#: The schema version this code reads and writes.
SCHEMA_VERSION = 4

#: Big integers that are also SQLite's rowid alias (so positions autoincrement).
_Position = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
#: Times are seconds since the epoch: one portable, index-friendly representation.
_Time = sa.Float(precision=53).with_variant(postgresql.DOUBLE_PRECISION(), "postgresql")
_Id = sa.String(255)


@dataclass(frozen=True)
class Tables:
    metadata: sa.MetaData
    events: sa.Table
    messages: sa.Table
    dead_letters: sa.Table
    schema_version: sa.Table
    queues: sa.Table
    bindings: sa.Table
    transient_messages: sa.Table
    results: sa.Table
    chords: sa.Table
    chord_parts: sa.Table

    @property
    def projections(self) -> tuple[sa.Table, ...]:
        """Tables derived from the log, in the order they may be emptied."""
        return (
            self.messages, self.dead_letters, self.results, self.chords, self.chord_parts
        )


def make_tables(prefix: str = "eventstore_", schema: str | None = None) -> Tables:
    md = sa.MetaData(schema=schema)
    events = sa.Table(
        f"{prefix}events",
        md,
        sa.Column("position", _Position, primary_key=True, autoincrement=True),
        sa.Column("stream_id", _Id, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("data", _Json, nullable=False),
        sa.Column("metadata", _Json, nullable=True),
        sa.Column("recorded_at", _Time, nullable=False),
        # The arbiter of every race: one event per (stream, version).
        sa.UniqueConstraint("stream_id", "version", name=f"{prefix}events_stream_version"),
    )
    sa.Index(f"{prefix}events_recorded_at", events.c.recorded_at)

    messages = sa.Table(
        f"{prefix}messages",
        md,
        sa.Column("delivery_id", _Id, primary_key=True),
        sa.Column("stream_id", _Id, nullable=False),
        sa.Column("queue", sa.String(255), nullable=False),
        sa.Column("priority", sa.SmallInteger, nullable=False),
        # Position of the Published event: "oldest first" within a priority.
        sa.Column("seq", sa.BigInteger, nullable=False),
        # When it may next be claimed: its not_before while ready, its lease's
        # end while claimed.  One column makes "claimable now" one range test.
        sa.Column("available_at", _Time, nullable=False),
        sa.Column("not_before", _Time, nullable=True),
        sa.Column("expires", _Time, nullable=True),
        sa.Column("claim_id", _Id, nullable=True),
        sa.Column("consumer", sa.String(255), nullable=True),
        sa.Column("claimed_at", _Time, nullable=True),
        sa.Column("lease_until", _Time, nullable=True),
    )
    sa.Index(
        f"{prefix}messages_claim_order",
        messages.c.queue,
        messages.c.priority.desc(),
        messages.c.seq,
    )
    sa.Index(f"{prefix}messages_stream", messages.c.stream_id)
    # Scheduled messages by queue and ETA, for a consumer's "when is the next one
    # due?": the first entry past now, however many are scheduled.
    # not_before never changes on a claim, so claims stay HOT updates on PostgreSQL.
    scheduled = messages.c.not_before.is_not(None)
    sa.Index(
        f"{prefix}messages_scheduled", messages.c.queue, messages.c.not_before,
        postgresql_where=scheduled, sqlite_where=scheduled,
    )

    dead_letters = sa.Table(
        f"{prefix}dead_letters",
        md,
        sa.Column("delivery_id", _Id, primary_key=True),
        sa.Column("stream_id", _Id, nullable=False),
        sa.Column("queue", sa.String(255), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("dead_at", _Time, nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
    )
    sa.Index(f"{prefix}dead_letters_queue", dead_letters.c.queue)

    schema_version = sa.Table(
        f"{prefix}schema_version",
        md,
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("applied_at", _Time, nullable=False),
    )
    queues = sa.Table(
        f"{prefix}queues",
        md,
        sa.Column("name", sa.String(255), primary_key=True),
        # Transient queues (auto-delete, exclusive, or with a TTL) never touch the log.
        sa.Column("transient", sa.Boolean, nullable=False),
        sa.Column("expires", _Time, nullable=True),  # x-expires, seconds idle
        sa.Column("message_ttl", _Time, nullable=True),  # x-message-ttl, seconds
        sa.Column("last_active", _Time, nullable=False),
    )

    bindings = sa.Table(
        f"{prefix}bindings",
        md,
        sa.Column("exchange", sa.String(255), primary_key=True),
        sa.Column("queue", sa.String(255), primary_key=True),
        sa.Column("routing_key", sa.String(255), primary_key=True),
        sa.Column("pattern", sa.String(1024), nullable=True),
        sa.Column("exchange_type", sa.String(32), nullable=False),
    )
    sa.Index(f"{prefix}bindings_queue", bindings.c.queue)

    transient_messages = sa.Table(
        f"{prefix}transient_messages",
        md,
        sa.Column("id", _Position, primary_key=True, autoincrement=True),
        sa.Column("queue", sa.String(255), nullable=False),
        sa.Column("priority", sa.SmallInteger, nullable=False),
        sa.Column("payload", _Json, nullable=False),
        sa.Column("expires_at", _Time, nullable=True),
    )
    sa.Index(
        f"{prefix}transient_messages_order",
        transient_messages.c.queue,
        transient_messages.c.priority.desc(),
        transient_messages.c.id,
    )
    results = sa.Table(
        f"{prefix}results",
        md,
        sa.Column("stream_id", _Id, primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        # The result as the Celery backend encoded it: the store never decodes it.
        sa.Column("result", _Json, nullable=True),
        sa.Column("date_done", _Time, nullable=True),
    )
    sa.Index(f"{prefix}results_date_done", results.c.date_done)
    chords = sa.Table(
        f"{prefix}chords",
        md,
        sa.Column("stream_id", _Id, primary_key=True),
        # The chord stream's version these counts are at: the log's next append
        # goes after it, under the same (stream_id, version) key as any other.
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("counted", sa.Integer, nullable=False),
        sa.Column("completed", sa.Boolean, nullable=False),
    )
    chord_parts = sa.Table(
        f"{prefix}chord_parts",
        md,
        sa.Column("stream_id", _Id, primary_key=True),
        sa.Column("task_id", _Id, primary_key=True),
    )
    return Tables(
        md,
        events,
        messages,
        dead_letters,
        schema_version,
        queues,
        bindings,
        transient_messages,
        results,
        chords,
        chord_parts,
    )
