"""SQLite: WAL, a busy timeout, and ``BEGIN IMMEDIATE`` for every write.

Writers take the database's write lock when their transaction starts, so a claim
never finds a conflict half-way through, and SQLite's "database is locked" error
only appears after the busy timeout -- a real stall, never a hidden race.  A
writer waiting for the lock tries again every millisecond at most
(:func:`take_write_lock`).  Read-only transactions use a plain ``BEGIN`` and run
beside the writer (WAL).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import os.path
import random
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from ..borrowed import NONE, OPEN, ConnectionInfo
from . import Dialect

logger = logging.getLogger(__name__)

#: How long a writer waits for the write lock before giving up.
BUSY_TIMEOUT_SECONDS = 30.0
_BUSY_TIMEOUT_PRAGMA = f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_SECONDS * 1000)}"
#: A writer's first and longest sleeps between tries for the write lock.
WRITE_LOCK_FIRST_PAUSE = 0.00005
WRITE_LOCK_LONGEST_PAUSE = 0.001
_READ_ONLY = "celery_eventstore_read_only"

#: Our commits between two checkpoints of the store's own thread: at a dozen
#: pages a publish, about SQLite's own cadence (1000 pages).
CHECKPOINT_EVERY_COMMITS = 80
#: How soon after the last commit a checkpoint follows when commits stop.
CHECKPOINT_IDLE_SECONDS = 1.0
#: SQLite's own checkpoint on commit, as a backstop only (pages of WAL): had
#: the thread fallen behind, the WAL stays bounded.
BACKSTOP_CHECKPOINT_PAGES = 10_000


class SQLiteDialect(Dialect):
    name = "sqlite"
    single_writer = True
    # SQLite's busy handler polls a waiting writer's lock at most every 100 ms:
    # a job that took the lock again at once, batch after batch, would starve it.
    writer_pause = 0.12

    def same_database(self, a: sa.URL, b: sa.URL) -> bool:
        return os.path.realpath(a.database or "") == os.path.realpath(b.database or "")

    def engine_options(self, url: sa.URL) -> dict[str, Any]:
        return {"connect_args": {"timeout": BUSY_TIMEOUT_SECONDS, "check_same_thread": False}}

    def configure(self, engine: sa.Engine, given: sa.URL) -> None:
        @sa.event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, record: Any) -> None:
            # Let us emit BEGIN ourselves instead of the driver's implicit one.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute(_BUSY_TIMEOUT_PRAGMA)
            _enter_wal(cur)
            cur.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints are the store's thread's (WalCheckpointer), not the
            # committing caller's.
            cur.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_CHECKPOINT_PAGES}")
            cur.close()

        # Our BEGIN, where SQLAlchemy begins a transaction, through the dialect's
        # hook rather than a "begin" event: any connection event on the engine
        # sends every statement through SQLAlchemy's event dispatch (about 60%
        # more Python per transaction).  The hook sees the pool's connection only,
        # so a read says what it is on it (:meth:`reading`).
        engine.dialect.do_begin = _begin  # type: ignore[method-assign,assignment]
        path = engine.url.database
        if path and path != ":memory:" and not path.startswith("file:"):
            self._checkpointer = WalCheckpointer(path)

    _checkpointer: WalCheckpointer | None = None

    def committed(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.committed()

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()

    @classmethod
    def describe(cls, dbapi_connection: Any) -> ConnectionInfo | None:
        if not isinstance(dbapi_connection, sqlite3.Connection):
            return None
        # A read of the schema list: it starts no transaction and takes no lock.
        rows = dbapi_connection.execute("PRAGMA database_list").fetchall()
        path = next((file for _, name, file in rows if name == "main"), "")
        url = sa.URL.create("sqlite+pysqlite", database=path or None)
        return ConnectionInfo(url, OPEN if _in_transaction(dbapi_connection) else NONE)
    def one_of(self, column: sa.ColumnElement[Any], values: str) -> sa.ColumnElement[bool]:
        # The list as one JSON array; SQLite looks each member up by the index.
        listed = sa.func.json_each(sa.bindparam(values, type_=_JsonList())).table_valued("value")
        return column.in_(sa.select(listed.c.value))

    def json_field(self, column: sa.ColumnElement[Any], key: str) -> sa.ColumnElement[str]:
        return sa.func.json_extract(column, sa.literal_column(f"'$.{key}'"), type_=sa.Text)

    def blank_json_field(
        self, column: sa.ColumnElement[Any], key: str, where: sa.ColumnElement[bool]
    ) -> sa.ColumnElement[Any]:
        # json_replace changes only a member that exists; text that is not JSON
        # would fail the whole read, hence json_valid.
        blanked = sa.func.json_replace(
            column, sa.literal_column(f"'$.{key}'"), sa.func.json(sa.literal_column("'null'")),
            type_=column.type,
        )
        return sa.case((sa.and_(where, sa.func.json_valid(column)), blanked), else_=column)

    def insert_numbered(
        self, conn: sa.Connection, returning: sa.Executable, plain: sa.Executable,
        rows: Sequence[dict[str, Any]],
    ) -> list[int]:
        # SQLAlchemy sends a RETURNING that must keep the rows' order one row at a
        # time here.  Inside a transaction that has begun, the rows of one
        # executemany take consecutive rowids (each the largest plus one; no other
        # writer can come between once the first row is in): the last one's tells
        # them all.  Outside one (a caller's connection in autocommit, or whose
        # transaction the driver has not begun yet) each row would commit alone.
        # One row (a result, a single publish) is told by the cursor's lastrowid:
        # a RETURNING costs SQLAlchemy a result to build, about half the insert.
        if len(rows) == 1:
            return [int(conn.execute(plain, rows[0]).lastrowid)]
        dbapi = conn.connection.dbapi_connection
        positions: list[int] = []
        if not getattr(dbapi, "in_transaction", False):
            # The driver begins a caller's transaction with its first write (an
            # atomic() batch that is the transaction's first write): that row
            # alone, then the rest as one batch.
            positions = [int(conn.execute(plain, rows[0]).lastrowid)]
            rows = rows[1:]
            if not getattr(dbapi, "in_transaction", False):  # autocommit: row by row
                return positions + [int(conn.execute(plain, row).lastrowid) for row in rows]
        if len(rows) == 1:
            return [*positions, int(conn.execute(plain, rows[0]).lastrowid)]
        conn.execute(plain, rows)
        last = int(conn.exec_driver_sql("SELECT last_insert_rowid()").scalar_one())
        return positions + list(range(last - len(rows) + 1, last + 1))

    def upsert(
        self, table: sa.Table, columns: Sequence[str], keys: Sequence[str]
    ) -> sa.Executable:
        stmt = sqlite_insert(table).values({c: sa.bindparam(c) for c in columns})
        update = {c: stmt.excluded[c] for c in columns if c not in keys}
        return stmt.on_conflict_do_update(index_elements=list(keys), set_=update)

    atomic_join = False

    @contextlib.contextmanager
    def join(self, connection: sa.Connection) -> Iterator[sa.Connection]:
        # No savepoint: with the stdlib driver's default transaction handling a
        # SAVEPOINT opened before the caller's first write starts a transaction of
        # its own, and RELEASE would commit it -- the job would outlive a rollback.
        # None is needed either: a failed statement does not poison a SQLite
        # transaction, so a lost race is retried in place.
        yield connection

    @contextlib.contextmanager
    def reading(self, conn: sa.Connection) -> Iterator[sa.Connection]:
        conn.connection.info[_READ_ONLY] = True
        try:
            yield conn
        finally:  # unused (nothing was read): the next writer must not inherit it
            if not conn.invalidated and not conn.closed:
                conn.connection.info.pop(_READ_ONLY, None)


def _begin(connection: Any) -> None:
    """Begin a transaction on the pool's proxy of a sqlite3 connection: a plain
    ``BEGIN`` for a read, ``BEGIN IMMEDIATE`` (the write lock now) otherwise."""
    if connection.info.pop(_READ_ONLY, False):
        connection.dbapi_connection.execute("BEGIN")
    else:
        take_write_lock(connection.dbapi_connection)


def take_write_lock(dbapi_conn: Any, timeout: float = BUSY_TIMEOUT_SECONDS) -> None:
    """``BEGIN IMMEDIATE``, trying again for the write lock every millisecond at
    most until ``timeout``; then SQLite's "database is locked", as its busy
    timeout would give.

    SQLite's own busy handler sleeps 1, 2, 5, 10, 15 ... 100 ms between tries:
    a writer that missed the lock three times had slept 8 ms, for a lock held
    well under one.  A worker's consumer and its pool processes writing
    results take turns at the lock all the time, and spent much of it asleep.
    The handler is off for these tries only: any other statement still waits
    out a lock as before.
    """
    deadline = time.monotonic() + timeout
    pause = WRITE_LOCK_FIRST_PAUSE
    dbapi_conn.execute("PRAGMA busy_timeout=0")
    try:
        while True:
            try:
                dbapi_conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(pause)
            pause = min(2 * pause, WRITE_LOCK_LONGEST_PAUSE)
    finally:
        with contextlib.suppress(sqlite3.Error):  # never hide the error being raised
            dbapi_conn.execute(_BUSY_TIMEOUT_PRAGMA)


_SQLITE_BUSY = 5  # the primary result code; its extended codes share the low byte


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return bool(code & 0xFF == _SQLITE_BUSY)
    return "locked" in str(exc)


class WalCheckpointer:
    """Copies the WAL's pages back into the database file on a thread of its own.

    SQLite checkpoints in the commit that takes the WAL past 1000 pages: with
    ``synchronous=NORMAL`` the only disk flushes are a checkpoint's, so one
    publish in a hundred waited 20 ms for them (delay() p99).  Here a thread
    runs a PASSIVE checkpoint (it never waits for, nor holds up, readers and
    the writer) after every :data:`CHECKPOINT_EVERY_COMMITS` of this process's
    commits, and once commits stop; SQLite's own remains as a backstop at
    :data:`BACKSTOP_CHECKPOINT_PAGES`.  The checkpoint's I/O runs outside the
    GIL, beside the caller.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._commits = 0
        self._wake = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        #: (busy, WAL frames, frames copied) of the last checkpoint, for tests.
        self.last: tuple[int, int, int] | None = None

    def committed(self) -> None:
        self._commits += 1
        if self._thread is None or self._pid != os.getpid():
            self._start()
        if self._commits >= CHECKPOINT_EVERY_COMMITS:
            self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    def _start(self) -> None:
        # A forked child inherits no thread: its own starts at its first commit.
        self._pid = os.getpid()
        self._wake = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="eventstore-sqlite-checkpoint", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        wake, conn = self._wake, None
        try:
            while not self._stopped:
                woken = wake.wait(CHECKPOINT_IDLE_SECONDS)
                wake.clear()
                if self._stopped or (not woken and not self._commits):
                    continue
                self._commits = 0
                try:
                    if conn is None:  # never creates the file (gone: nothing to do)
                        conn = sqlite3.connect(
                            "file:" + urllib.parse.quote(self.path) + "?mode=rw", uri=True,
                            isolation_level=None, check_same_thread=False,
                        )
                    self.last = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:  # the backstop checkpoints meanwhile
                    logger.debug("checkpoint of %s failed: %s", self.path, exc)
        finally:
            if conn is not None:
                conn.close()


class _JsonList(sa.types.TypeDecorator[Any]):
    """A list bound as its JSON array text (also rendered as a literal, for plans)."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        return None if value is None else json.dumps(list(value))

    def process_literal_param(self, value: Any, dialect: Any) -> str:
        text = self.process_bind_param(value, dialect) or "null"
        return "'" + text.replace("'", "''") + "'"


def _in_transaction(conn: sqlite3.Connection) -> bool:
    """Open, or opened by the driver with the next write (its DB-API mode)."""
    if conn.in_transaction:
        return True
    autocommit = getattr(conn, "autocommit", None)  # Python 3.12+
    if isinstance(autocommit, bool):
        return not autocommit
    return conn.isolation_level is not None


def _enter_wal(cursor: Any) -> None:
    """Switch the file to WAL mode, waiting out other processes doing the same.

    Several processes opening a new file at once (a newcomer's first workers) race to
    change its journal mode, and SQLite answers the losers "database is locked" at
    once, without its busy handler, to break the deadlock: they try again until the
    busy timeout.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.005, 0.05))
