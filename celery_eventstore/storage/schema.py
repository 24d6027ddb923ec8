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
  index lookup on a small table however long the history grows; messages with
  an ETA are indexed apart, by when they fall due, so a backlog of them costs a
  claim nothing until they do.
* ``dead_letters`` -- deliveries that were dead-lettered and not retried.
* ``results`` -- each task's (or group's) latest result state, for the result
  backend: one indexed read per ``AsyncResult``, however long the stream.
* ``tasks`` -- one row per task stream (name, state, queue, worker, links, when it
  began), for finding tasks (``celery-eventstore tasks``) without scanning the log.
  It outlives results: an expired or forgotten result leaves the row as it was.
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

A log created partitioned (PostgreSQL, ``partitioned_log=True``) has the same
columns, partitioned by ``born``: see ``migrations/partitioned_log.py`` and
``partitions.py``.

``schema_version`` records which versions ran; it is bookkeeping, not state.
Every name carries the configured prefix and, on PostgreSQL, the schema.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

#: The schema version this code reads and writes.
SCHEMA_VERSION = 7

#: Big integers that are also SQLite's rowid alias (so positions autoincrement).
_Position = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
#: Times are seconds since the epoch: one portable, index-friendly representation.
_Time = sa.Float(precision=53).with_variant(postgresql.DOUBLE_PRECISION(), "postgresql")
_Id = sa.String(255)


#: Metadata keys of a publish that link its task to others of its canvas
#: (``history --tree``): Celery's ``root_id`` and ``group``.
CANVAS_LINKS = ("root_id", "group")
#: An index per canvas link on the events that carry one (a task that is its own
#: root has nothing to find), by dialect: JSON is read differently by each.
CANVAS_LINK_INDEXES = {
    "postgresql": (
        "CREATE INDEX {prefix}events_{key} ON %(fullname)s ((metadata ->> '{key}')) "
        "WHERE (metadata ->> '{key}') <> stream_id"
    ),
    "sqlite": (
        "CREATE INDEX {prefix}events_{key} ON %(fullname)s (json_extract(metadata, '$.{key}')) "
        "WHERE json_extract(metadata, '$.{key}') <> stream_id"
    ),
}


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
    tasks: sa.Table
    chords: sa.Table
    chord_parts: sa.Table

    @property
    def projections(self) -> tuple[sa.Table, ...]:
        """Tables derived from the log, in the order they may be emptied."""
        return (
            self.messages, self.dead_letters, self.results, self.tasks, self.chords,
            self.chord_parts,
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
        # The stream's birth day (days since the epoch, UTC), on each of its
        # events: a partitioned log's partition key (NULL on events of an
        # ordinary log older than version 7).
        sa.Column("born", sa.Integer, nullable=True),
        # The arbiter of every race: one event per (stream, version) (on a
        # partitioned log, (stream, version, born): one born per stream).
        sa.UniqueConstraint("stream_id", "version", name=f"{prefix}events_stream_version"),
    )
    sa.Index(f"{prefix}events_recorded_at", events.c.recorded_at)
    for dialect, sql in CANVAS_LINK_INDEXES.items():
        for key in CANVAS_LINKS:
            ddl = sql.format(prefix=prefix, key=key)
            sa.event.listen(events, "after_create", sa.DDL(ddl).execute_if(dialect=dialect))

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
    # A claim reads two bounded index ranges per queue, never the rows waiting
    # for later: messages without an ETA in claim order (only those in flight are
    # stepped over), and messages with one in the order they fall due.
    unscheduled = messages.c.not_before.is_(None)
    sa.Index(
        f"{prefix}messages_ready",
        messages.c.queue,
        messages.c.priority.desc(),
        messages.c.seq,
        postgresql_where=unscheduled,
        sqlite_where=unscheduled,
    )
    scheduled = messages.c.not_before.is_not(None)
    sa.Index(
        f"{prefix}messages_scheduled",
        messages.c.queue,
        messages.c.not_before,
        postgresql_where=scheduled,
        sqlite_where=scheduled,
    )
    sa.Index(f"{prefix}messages_stream", messages.c.stream_id)

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

    tasks = sa.Table(
        f"{prefix}tasks",
        md,
        sa.Column("stream_id", _Id, primary_key=True),
        sa.Column("name", _Id, nullable=True),
        # The task's state as the history tells it: an expired result keeps it.
        sa.Column("state", _Id, nullable=False),
        sa.Column("queue", _Id, nullable=True),
        sa.Column("worker", _Id, nullable=True),
        sa.Column("parent_id", _Id, nullable=True),
        sa.Column("root_id", _Id, nullable=True),
        sa.Column("group_id", _Id, nullable=True),
        # When its stream began: the listing's order (newest first, then by id: one
        # transaction may publish thousands) and time range.
        sa.Column("created_at", _Time, nullable=False),
    )
    sa.Index(f"{prefix}tasks_created", tasks.c.created_at, tasks.c.stream_id)
    for column in ("name", "state", "queue", "worker"):
        sa.Index(f"{prefix}tasks_{column}", tasks.c[column], tasks.c.created_at, tasks.c.stream_id)
    for column in ("parent_id", "root_id", "group_id"):
        sa.Index(f"{prefix}tasks_{column}", tasks.c[column])
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
        tasks,
        chords,
        chord_parts,
    )
