"""Version 2: routing state shared by every process (queues, bindings, transient messages).

Frozen: this is what version 2 created in every database that ran it.  Never edit
it; a schema change is a new module (see the package docstring).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.schema import CreateIndex, CreateTable

from .v0001_log_and_queue import Json, Position, Time


def statements(prefix: str, schema: str | None) -> list[sa.ClauseElement]:
    md = sa.MetaData(schema=schema)
    queues = sa.Table(
        f"{prefix}queues",
        md,
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("transient", sa.Boolean, nullable=False),
        sa.Column("expires", Time, nullable=True),
        sa.Column("message_ttl", Time, nullable=True),
        sa.Column("last_active", Time, nullable=False),
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
    transient = sa.Table(
        f"{prefix}transient_messages",
        md,
        sa.Column("id", Position, primary_key=True, autoincrement=True),
        sa.Column("queue", sa.String(255), nullable=False),
        sa.Column("priority", sa.SmallInteger, nullable=False),
        sa.Column("payload", Json, nullable=False),
        sa.Column("expires_at", Time, nullable=True),
    )
    t = transient.c
    return [
        CreateTable(queues),
        CreateTable(bindings),
        CreateIndex(sa.Index(f"{prefix}bindings_queue", bindings.c.queue)),
        CreateTable(transient),
        CreateIndex(
            sa.Index(f"{prefix}transient_messages_order", t.queue, t.priority.desc(), t.id)
        ),
    ]
