"""Version 3: the result backend's read model (each stream's latest result state).

Frozen: this is what version 3 created in every database that ran it.  Never edit
it; a schema change is a new module (see the package docstring).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.schema import CreateIndex, CreateTable

from .v0001_log_and_queue import Id, Json, Time


def statements(prefix: str, schema: str | None) -> list[sa.ClauseElement]:
    results = sa.Table(
        f"{prefix}results",
        sa.MetaData(schema=schema),
        sa.Column("stream_id", Id, primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("result", Json, nullable=True),
        sa.Column("date_done", Time, nullable=True),
    )
    return [
        CreateTable(results),
        CreateIndex(sa.Index(f"{prefix}results_date_done", results.c.date_done)),
    ]
