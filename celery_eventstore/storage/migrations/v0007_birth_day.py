"""Version 7: each event records its stream's birth day (``born``).

``born`` is the day (since the epoch, UTC) the stream's first event was
appended, the same on every event of a stream.  On an ordinary log it is only
information, and events appended before this version have none.  On a
partitioned log (created as one, see :mod:`.partitioned_log`) it is the
partition key, so a whole stream lives in one partition and old partitions can
be dropped whole.

Frozen: this is what version 7 did in every database that ran it.  Never edit it;
a schema change is a new module (see the package docstring).
"""

from __future__ import annotations

import sqlalchemy as sa


def statements(prefix: str, schema: str | None) -> list[sa.ClauseElement]:
    events = sa.Table(f"{prefix}events", sa.MetaData(schema=schema))
    # Nullable with no default: PostgreSQL adds it without rewriting the log.
    return [sa.DDL("ALTER TABLE %(fullname)s ADD COLUMN born INTEGER").against(events)]
