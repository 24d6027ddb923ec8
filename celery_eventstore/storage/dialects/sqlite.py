"""SQLite: WAL, a busy timeout, and ``BEGIN IMMEDIATE`` for every write.

Writers take the database's write lock when their transaction starts, so a claim
never finds a conflict half-way through, and SQLite's "database is locked" error
only appears after the busy timeout -- a real stall, never a hidden race.
Read-only transactions use a plain ``BEGIN`` and run beside the writer (WAL).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from . import Dialect

#: How long a writer waits for the write lock before giving up.
BUSY_TIMEOUT_SECONDS = 30.0
_READ_ONLY = "celery_eventstore_read_only"


class SQLiteDialect(Dialect):
    name = "sqlite"

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

    def read_options(self) -> dict[str, Any]:
        return {_READ_ONLY: True}
