"""Version 6: each chord's counter as a read model, so counting a part reads one row.
(A consumer finds the next scheduled message due through version 5's
``messages_scheduled`` index.)

Frozen: this is what version 6 created in every database that ran it.  Never edit
it; a schema change is a new module (see the package docstring).

A chord that was counting when this version ran has no row yet: the store folds
its stream once and writes the row then (see ``storage/chords.py``).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.schema import CreateTable

from .v0001_log_and_queue import Id


def statements(prefix: str, schema: str | None) -> list[sa.ClauseElement]:
    md = sa.MetaData(schema=schema)
    chords = sa.Table(
        f"{prefix}chords",
        md,
        sa.Column("stream_id", Id, primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("counted", sa.Integer, nullable=False),
        sa.Column("completed", sa.Boolean, nullable=False),
    )
    chord_parts = sa.Table(
        f"{prefix}chord_parts",
        md,
        sa.Column("stream_id", Id, primary_key=True),
        sa.Column("task_id", Id, primary_key=True),
    )
    return [CreateTable(chords), CreateTable(chord_parts)]
