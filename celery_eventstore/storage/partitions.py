"""The partitioned log (PostgreSQL): partitions made ahead, old ones dropped whole.

A store created with ``partitioned_log=True`` keeps ``events`` partitioned by
``born``, its streams' birth day: one partition per day, named
``<prefix>events_<YYYYMMDD>``, and a DEFAULT partition for events of days that
had none (see ``migrations/partitioned_log.py``).

* :meth:`Partitions.create_ahead` (``celery-eventstore maintain``, and each
  worker once a day) makes the partitions of the coming days, so new streams
  never land in the DEFAULT partition.
* :meth:`Partitions.drop_before` (``prune`` on a partitioned log) takes each
  partition of a day wholly before the cutoff, moves the streams of it that are
  still alive (a message pending, a dead letter, an event since the cutoff) into
  today's partition, deletes the derived rows of the others, and drops it: no
  ``DELETE`` of the log's rows, no dead tuples, no vacuum.

Moving a stream copies its events to today's partition with the same positions
(the derived tables refer to positions) and a new ``born``, and deletes them from
the old one, in one transaction, holding the stream against writers: every
writer holds the streams it read until it commits (:meth:`EventLog.hold_streams`,
a shared lock), so an append never goes to the partition a stream just left.

DDL on a partition takes an exclusive lock on ``events`` for an instant, which
waits for the transactions using it and makes new ones wait behind it: each such
statement runs with a short ``lock_timeout`` and is tried again, so workers stall
for at most about that long.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY

from ..exceptions import DatabaseUnavailable
from .database import Database
from .log import SECONDS_PER_DAY, EventLog, birth_day

#: Seconds a partition's DDL may wait for its lock before it gives way and retries.
DDL_LOCK_TIMEOUT = "200ms"
#: Tries of one partition's DDL before giving up (the lock never came).
DDL_TRIES = 50
#: Streams moved per transaction.
MOVE_BATCH = 500
#: Streams whose derived rows are deleted per transaction before a drop.
FORGET_BATCH = 5000
#: The ``events`` storage settings of schema version 5, set on each partition (a
#: partitioned table holds none of its own).
PARTITION_SETTINGS = (
    "autovacuum_vacuum_insert_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02"
)
_COLUMNS = ("position", "stream_id", "version", "type", "data", "metadata", "recorded_at")

Progress = Callable[[int, int], None]
logger = logging.getLogger(__name__)


class Partitions:
    """The daily partitions of one store's log."""

    def __init__(self, db: Database, log: EventLog) -> None:
        self.db = db
        self.log = log
        self.tables = log.queries.tables
        self.events = self.tables.events
        self.prefix = self.events.name  # "<prefix>events"
        self.schema = self.events.schema
        self._name = re.compile(rf"^{re.escape(self.prefix)}_(\d{{8}})$")

    # -- naming -------------------------------------------------------------------

    def name_of(self, day: int) -> str:
        """The partition of one birth day: ``<prefix>events_<YYYYMMDD>``."""
        date = dt.date(1970, 1, 1) + dt.timedelta(days=day)
        return f"{self.prefix}_{date:%Y%m%d}"

    def day_of(self, name: str) -> int | None:
        """The birth day a partition holds (None: not one of the daily ones)."""
        found = self._name.match(name)
        if found is None:
            return None
        date = dt.datetime.strptime(found.group(1), "%Y%m%d").date()
        return (date - dt.date(1970, 1, 1)).days

    def _quoted(self, conn: sa.Connection, name: str) -> str:
        return conn.dialect.identifier_preparer.format_table(self._table(name))

    def _table(self, name: str) -> sa.TableClause:
        return sa.table(name, *(sa.column(c) for c in (*_COLUMNS, "born")), schema=self.schema)

    # -- listing and making ---------------------------------------------------------

    def days(self) -> list[int]:
        """The birth days that have a partition of their own, oldest first."""
        with self.db.read() as conn:
            return self._days(conn)

    def _days(self, conn: sa.Connection) -> list[int]:
        parent = conn.dialect.identifier_preparer.format_table(self.events)
        names = conn.execute(
            sa.text(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = to_regclass(:parent)"
            ),
            {"parent": parent},
        ).scalars()
        return sorted(d for d in map(self.day_of, names) if d is not None)

    def create_ahead(self, days: int = 7, *, first: int | None = None) -> list[str]:
        """Make the partitions of today (or of day ``first``) and the ``days``
        after it that are missing; returns the names made."""
        start = birth_day(self.db.now()) if first is None else first
        with self.db.read() as conn:
            have = set(self._days(conn))
        made = []
        for day in range(start, start + days + 1):
            if day in have:
                continue
            if self._in_default(day):
                # A partition cannot take a day the DEFAULT partition holds rows
                # of; they stay there, and prune deletes them in batches.
                logger.warning("events of %s are in the DEFAULT partition: not made",
                               self.name_of(day))
                continue
            self._ddl(functools.partial(self._create, day))
            made.append(self.name_of(day))
        return made

    def _in_default(self, day: int) -> bool:
        default = self._table(f"{self.prefix}_default")
        query = sa.select(sa.literal(1)).where(default.c.born == day).limit(1)
        with self.db.read() as conn:
            return conn.execute(query).first() is not None

    def _create(self, day: int, conn: sa.Connection) -> None:
        parent = conn.dialect.identifier_preparer.format_table(self.events)
        conn.exec_driver_sql(
            f"CREATE TABLE IF NOT EXISTS {self._quoted(conn, self.name_of(day))} "
            f"PARTITION OF {parent} FOR VALUES FROM ({day}) TO ({day + 1}) "
            f"WITH ({PARTITION_SETTINGS})"
        )

    def _ddl(self, statement: Callable[[sa.Connection], Any]) -> None:
        """Run one DDL statement in a transaction of its own that waits at most
        :data:`DDL_LOCK_TIMEOUT` for its lock, until it gets it."""
        for tries in range(DDL_TRIES):
            try:
                with self.db.translate_errors(), self.db.engine.begin() as conn:
                    # Workers making the same day at once take turns (IF NOT EXISTS
                    # alone still races on the catalog).
                    self.db.dialect.lock_migrations(conn, f"{self.schema}.{self.prefix}:days")
                    conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'")
                    statement(conn)
                    return
            except DatabaseUnavailable:  # lock_not_available, among others
                if tries == DDL_TRIES - 1:
                    raise
                time.sleep(0.05 * (tries + 1))

    # -- pruning ----------------------------------------------------------------------

    def drop_before(self, before: float, progress: Progress | None = None) -> int:
        """Drop every daily partition whose day ended by ``before``, after moving
        its live streams to today's partition; returns the streams dropped."""
        with self.db.read() as conn:
            old = [d for d in self._days(conn) if (d + 1) * SECONDS_PER_DAY <= before]
        dropped = 0
        for done, day in enumerate(old, start=1):
            dropped += self._drop(self.name_of(day), before)
            if progress is not None:
                progress(done, len(old))
        return dropped

    def _drop(self, name: str, before: float) -> int:
        part = self._table(name)
        while live := self._live(part, before):
            self.db.retrying(functools.partial(self._move, part, live))
        forgotten = 0
        after = ""
        while streams := self._streams_after(part, after):
            self.db.retrying(functools.partial(self._forget, streams))
            forgotten += len(streams)
            after = streams[-1]
        self._ddl(lambda conn: conn.exec_driver_sql(f"DROP TABLE {self._quoted(conn, name)}"))
        return forgotten

    def _live(self, part: sa.TableClause, before: float) -> list[str]:
        """Streams of the partition that a prune keeps: a message pending or a
        dead letter, or an event since ``before`` (a batch of them)."""
        msgs, dl = self.tables.messages, self.tables.dead_letters
        in_part = sa.exists().where(part.c.stream_id == msgs.c.stream_id)
        dead_in_part = sa.exists().where(part.c.stream_id == dl.c.stream_id)
        recent = part.c.recorded_at >= sa.bindparam("before", before, type_=sa.Float)
        live = sa.union(
            sa.select(msgs.c.stream_id).where(in_part),
            sa.select(dl.c.stream_id).where(dead_in_part),
            sa.select(part.c.stream_id).where(recent),
        ).subquery()
        query = sa.select(live.c.stream_id).order_by(live.c.stream_id).limit(MOVE_BATCH)
        with self.db.read() as conn:
            return list(conn.execute(query).scalars())

    def _move(self, part: sa.TableClause, streams: list[str], born: int | None = None) -> None:
        """Move ``streams`` from ``part`` to today's partition (or day ``born``'s),
        same positions."""
        wanted: sa.BindParameter[str] = sa.bindparam("streams", expanding=True)
        with self.db.write() as tx:
            self.db.dialect.lock_streams(tx.conn, self.log.move_keys(streams), shared=False)
            rows = sa.select(
                *(part.c[c] for c in _COLUMNS),
                sa.literal(birth_day(tx.now) if born is None else born, sa.Integer),
            ).where(part.c.stream_id.in_(wanted))
            tx.conn.execute(
                self.events.insert().from_select([*_COLUMNS, "born"], rows), {"streams": streams}
            )
            tx.conn.execute(part.delete().where(part.c.stream_id.in_(wanted)),
                            {"streams": streams})

    def _streams_after(self, part: sa.TableClause, after: str) -> list[str]:
        query = (
            sa.select(part.c.stream_id)
            .where(part.c.version == 1, part.c.stream_id > sa.bindparam("after"))
            .order_by(part.c.stream_id).limit(FORGET_BATCH)
        )
        with self.db.read() as conn:
            return list(conn.execute(query, {"after": after}).scalars())

    def _forget(self, streams: list[str]) -> None:
        """Delete the derived rows of streams about to be dropped."""
        # One array parameter: thousands of bound values cost more to send than to delete.
        wanted = sa.any_(sa.bindparam("streams", type_=ARRAY(sa.String)))
        with self.db.write() as tx:
            for table in self.tables.projections:
                tx.conn.execute(
                    table.delete().where(table.c.stream_id == wanted), {"streams": streams}
                )
