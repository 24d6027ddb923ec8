"""SQLite: WAL, a busy timeout, and ``BEGIN IMMEDIATE`` for every write.

Writers take the database's write lock when their transaction starts, so a claim
never finds a conflict half-way through, and SQLite's "database is locked" error
only appears after the busy timeout -- a real stall, never a hidden race.
Read-only transactions use a plain ``BEGIN`` and run beside the writer (WAL).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from . import ANY_QUEUE, Dialect, Listener

#: How long a writer waits for the write lock before giving up.
BUSY_TIMEOUT_SECONDS = 30.0
_READ_ONLY = "celery_eventstore_read_only"


class SQLiteDialect(Dialect):
    name = "sqlite"
    single_writer = True

    def engine_options(self, url: sa.URL) -> dict[str, Any]:
        return {"connect_args": {"timeout": BUSY_TIMEOUT_SECONDS, "check_same_thread": False}}

    def configure(self, engine: sa.Engine) -> None:
        @sa.event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, record: Any) -> None:
            # Let us emit BEGIN ourselves instead of the driver's implicit one.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_SECONDS * 1000)}")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _begin(conn: sa.Connection) -> None:
            if conn.get_execution_options().get(_READ_ONLY):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

    def upsert(
        self, conn: sa.Connection, table: sa.Table, values: dict[str, Any], keys: tuple[str, ...]
    ) -> None:
        stmt = sqlite_insert(table).values(values)
        update = {k: stmt.excluded[k] for k in values if k not in keys}
        conn.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=update))

    def listener(self, engine: sa.Engine, channels: Iterable[str]) -> Listener:
        return DataVersionListener(engine)

    atomic_join = False

    @contextlib.contextmanager
    def join(self, connection: sa.Connection) -> Iterator[sa.Connection]:
        # No savepoint: with the stdlib driver's default transaction handling a
        # SAVEPOINT opened before the caller's first write starts a transaction of
        # its own, and RELEASE would commit it -- the job would outlive a rollback.
        # None is needed either: a failed statement does not poison a SQLite
        # transaction, so a lost race is retried in place.
        yield connection

    def read_options(self) -> dict[str, Any]:
        return {_READ_ONLY: True}


class DataVersionListener(Listener):
    """Change detection by ``PRAGMA data_version``: no table is read to find out.

    The pragma's value changes whenever another connection commits to the file,
    so a consumer runs its claim query only after a write, not on every tick.
    Waiting polls the pragma with an interval that starts short after activity
    and grows while the database stays quiet.
    """

    MIN_INTERVAL = 0.005
    MAX_INTERVAL = 0.1

    def __init__(self, engine: sa.Engine) -> None:
        self._conn: Any = engine.raw_connection()
        self._version = self._read()
        self._interval = self.MIN_INTERVAL

    def _read(self) -> int:
        cur = self._conn.cursor()
        try:
            cur.execute("PRAGMA data_version")
            return int(cur.fetchone()[0])
        finally:
            cur.close()

    def poll(self) -> set[str]:
        version = self._read()
        if version == self._version:
            return set()
        self._version = version
        self._interval = self.MIN_INTERVAL
        return {ANY_QUEUE}

    def wait(self, timeout: float) -> set[str]:
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            woken = self.poll()
            remaining = deadline - time.monotonic()
            if woken or remaining <= 0:
                return woken
            time.sleep(min(self._interval, remaining))
            self._interval = min(self._interval * 2, self.MAX_INTERVAL)

    def close(self) -> None:
        self._conn.close()
