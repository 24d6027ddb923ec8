"""Version 1: the event log, the hot queue, the dead letters and the version book.

Frozen: this is what version 1 created in every database that ran it.  Never edit
it; a schema change is a new module (see the package docstring).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateIndex, CreateTable

# The column types as version 1 declared them.  Later versions import these (they
# are frozen with this module) instead of the live ones in ``schema.py``.

#: Big integers that are also SQLite's rowid alias (so positions autoincrement).
Position = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Time = sa.Float(precision=53).with_variant(postgresql.DOUBLE_PRECISION(), "postgresql")
Id = sa.String(255)


def statements(prefix: str, schema: str | None) -> list[sa.ClauseElement]:
    md = sa.MetaData(schema=schema)
    schema_version = sa.Table(
        f"{prefix}schema_version",
        md,
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("applied_at", Time, nullable=False),
    )
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
        sa.UniqueConstraint("stream_id", "version", name=f"{prefix}events_stream_version"),
    )
    messages = sa.Table(
        f"{prefix}messages",
        md,
        sa.Column("delivery_id", Id, primary_key=True),
        sa.Column("stream_id", Id, nullable=False),
        sa.Column("queue", sa.String(255), nullable=False),
        sa.Column("priority", sa.SmallInteger, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("available_at", Time, nullable=False),
        sa.Column("not_before", Time, nullable=True),
        sa.Column("expires", Time, nullable=True),
        sa.Column("claim_id", Id, nullable=True),
        sa.Column("consumer", sa.String(255), nullable=True),
        sa.Column("claimed_at", Time, nullable=True),
        sa.Column("lease_until", Time, nullable=True),
    )
    dead_letters = sa.Table(
        f"{prefix}dead_letters",
        md,
        sa.Column("delivery_id", Id, primary_key=True),
        sa.Column("stream_id", Id, nullable=False),
        sa.Column("queue", sa.String(255), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("dead_at", Time, nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
    )
    c = messages.c
    return [
        CreateTable(schema_version),
        CreateTable(events),
        CreateIndex(sa.Index(f"{prefix}events_recorded_at", events.c.recorded_at)),
        CreateTable(messages),
        CreateIndex(sa.Index(f"{prefix}messages_claim_order", c.queue, c.priority.desc(), c.seq)),
        CreateIndex(sa.Index(f"{prefix}messages_stream", c.stream_id)),
        CreateTable(dead_letters),
        CreateIndex(sa.Index(f"{prefix}dead_letters_queue", dead_letters.c.queue)),
    ]
