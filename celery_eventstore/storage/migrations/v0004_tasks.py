"""Version 4: the task index (one row per task stream, for finding tasks).

Frozen: this is what version 4 created in every database that ran it.  Never edit
it; a schema change is a new module (see the package docstring).  The table is a
projection: ``celery-eventstore rebuild`` fills it from the log on a database
that had tasks before this version.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.schema import CreateIndex, CreateTable

from .v0001_log_and_queue import Id, Time


def statements(prefix: str, schema: str | None) -> list[sa.ClauseElement]:
    tasks = sa.Table(
        f"{prefix}tasks",
        sa.MetaData(schema=schema),
        sa.Column("stream_id", Id, primary_key=True),
        sa.Column("name", Id, nullable=True),
        sa.Column("state", Id, nullable=False),
        sa.Column("queue", Id, nullable=True),
        sa.Column("worker", Id, nullable=True),
        sa.Column("parent_id", Id, nullable=True),
        sa.Column("root_id", Id, nullable=True),
        sa.Column("group_id", Id, nullable=True),
        sa.Column("created_at", Time, nullable=False),
    )
    indexes = [sa.Index(f"{prefix}tasks_created", tasks.c.created_at, tasks.c.stream_id)]
    indexes += [
        sa.Index(f"{prefix}tasks_{column}", tasks.c[column], tasks.c.created_at, tasks.c.stream_id)
        for column in ("name", "state", "queue", "worker")
    ]
    indexes += [
        sa.Index(f"{prefix}tasks_{column}", tasks.c[column])
        for column in ("parent_id", "root_id", "group_id")
    ]
    return [CreateTable(tasks), *(CreateIndex(index) for index in indexes)]
