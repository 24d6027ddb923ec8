"""The partitioned log (PostgreSQL): what replaces the empty ``events`` table of a
store created with ``partitioned_log=True``, right after version 7.

``events`` is partitioned by range of ``born`` (the stream's birth day), one
partition per day plus a DEFAULT partition for days nobody created ahead.
PostgreSQL wants the partition key in every unique key, so the primary key is
``(position, born)`` and the arbiter of every race is ``(stream_id, version,
born)``: the store appends every event of a stream with the ``born`` of the
stream's first event, so it arbitrates exactly as ``(stream_id, version)`` does.
Partitions keep the ``events`` storage settings of version 5 (a partitioned table
has none of its own): see ``storage/partitions.py``.

Frozen with version 7: a later version that changes ``events`` must say what it
does to a partitioned log too.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.schema import CreateIndex, CreateTable, DropTable

from .v0001_log_and_queue import Id, Json, Position, Time
from .v0005_claims_at_scale import CANVAS_LINK_INDEXES

#: The schema version after which a new store's log is replaced by this one.
AFTER_VERSION = 7


def statements(prefix: str, schema: str | None) -> list[sa.ClauseElement]:
    md = sa.MetaData(schema=schema)
    old = sa.Table(f"{prefix}events", md)
    md = sa.MetaData(schema=schema)
    events = sa.Table(
        f"{prefix}events",
        md,
        sa.Column("position", Position, primary_key=True, autoincrement=True),
        sa.Column("stream_id", Id, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("data", Json, nullable=False),
        sa.Column("metadata", Json, nullable=True),
        sa.Column("recorded_at", Time, nullable=False),
        sa.Column("born", sa.Integer, primary_key=True, autoincrement=False),
        sa.UniqueConstraint(
            "stream_id", "version", "born", name=f"{prefix}events_stream_version"
        ),
        postgresql_partition_by="RANGE (born)",
    )
    default = sa.Table(f"{prefix}events_default", md)
    out: list[sa.ClauseElement] = [
        DropTable(old),
        CreateTable(events),
        CreateIndex(sa.Index(f"{prefix}events_recorded_at", events.c.recorded_at)),
    ]
    for key in ("root_id", "group"):
        sql = CANVAS_LINK_INDEXES["postgresql"].format(prefix=prefix, key=key)
        out.append(sa.DDL(sql).against(events))
    out.append(
        sa.DDL(f"CREATE TABLE %(fullname)s PARTITION OF {_full(prefix, schema)} DEFAULT")
        .against(default)
    )
    return out


def _full(prefix: str, schema: str | None) -> str:
    name = f'"{prefix}events"'
    return f'"{schema}".{name}' if schema else name
