"""Version 5: claims that neither history nor a backlog of scheduled messages slows.

* ``messages_claim_order`` is replaced by two partial indexes: ``messages_ready``
  (messages without an ETA, in claim order) and ``messages_scheduled`` (messages
  with one, by when they fall due), so a claim reads bounded ranges of both and
  never the messages that are waiting for later.
* ``events_root_id`` and ``events_group``: the events whose metadata links them to
  another task of their canvas (Celery's ``root_id`` other than the task itself,
  and ``group``), so ``history --tree`` looks a canvas up instead of reading the
  log.
* On PostgreSQL, storage settings for the tables that churn: ``messages`` leaves
  room on its pages for claims to update rows in place (HOT) and is vacuumed after
  a fixed number of dead rows however small it is; the append-only ``events`` is
  vacuumed and analysed as it grows, not only after another 20% of its size.

Frozen: this is what version 5 did in every database that ran it.  Never edit it;
a schema change is a new module (see the package docstring).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.schema import CreateIndex, DropIndex

from .v0001_log_and_queue import Id, Time

#: The canvas link indexes, by dialect (each reads JSON its own way).
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

#: ``ALTER TABLE ... SET (...)`` per table, PostgreSQL only.
STORAGE_SETTINGS = {
    # Every message is inserted, updated once or twice and deleted: keep half of
    # each page free for in-place updates, and vacuum after 1000 dead rows
    # instead of 20% of a table that is nearly empty between bursts.
    "messages": (
        "fillfactor = 50, autovacuum_vacuum_scale_factor = 0, "
        "autovacuum_vacuum_threshold = 1000, autovacuum_analyze_scale_factor = 0, "
        "autovacuum_analyze_threshold = 1000, autovacuum_vacuum_cost_delay = 0"
    ),
    # Broadcast and reply traffic: inserted and deleted within seconds.
    "transient_messages": (
        "autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000, "
        "autovacuum_vacuum_cost_delay = 0"
    ),
    # Append-only and large: fresh statistics and visibility maps as it grows.
    "events": (
        "autovacuum_vacuum_insert_scale_factor = 0.02, "
        "autovacuum_analyze_scale_factor = 0.02"
    ),
    # One row per task, rewritten by each state change.
    "results": "fillfactor = 80, autovacuum_vacuum_scale_factor = 0.05",
}


def statements(prefix: str, schema: str | None) -> list[sa.ClauseElement]:
    md = sa.MetaData(schema=schema)
    messages = sa.Table(
        f"{prefix}messages",
        md,
        sa.Column("delivery_id", Id, primary_key=True),
        sa.Column("queue", sa.String(255), nullable=False),
        sa.Column("priority", sa.SmallInteger, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("not_before", Time, nullable=True),
    )
    c = messages.c
    unscheduled, scheduled = c.not_before.is_(None), c.not_before.is_not(None)
    out: list[sa.ClauseElement] = [
        DropIndex(sa.Index(f"{prefix}messages_claim_order", c.queue)),
        CreateIndex(sa.Index(
            f"{prefix}messages_ready", c.queue, c.priority.desc(), c.seq,
            postgresql_where=unscheduled, sqlite_where=unscheduled,
        )),
        CreateIndex(sa.Index(
            f"{prefix}messages_scheduled", c.queue, c.not_before,
            postgresql_where=scheduled, sqlite_where=scheduled,
        )),
    ]
    events = sa.Table(f"{prefix}events", md)
    for dialect, sql in CANVAS_LINK_INDEXES.items():
        for key in ("root_id", "group"):
            out.append(
                sa.DDL(sql.format(prefix=prefix, key=key)).against(events)
                .execute_if(dialect=dialect)
            )
    for name, settings in STORAGE_SETTINGS.items():
        known = {"messages": messages, "events": events}
        table = known[name] if name in known else sa.Table(f"{prefix}{name}", md)
        out.append(
            sa.DDL(f"ALTER TABLE %(fullname)s SET ({settings})")
            .against(table)
            .execute_if(dialect="postgresql")
        )
    return out
