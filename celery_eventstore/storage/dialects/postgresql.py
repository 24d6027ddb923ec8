"""PostgreSQL: SKIP LOCKED claims, LISTEN/NOTIFY wake-ups, the server's clock.

A plain ``postgresql://`` URL is pinned to psycopg2, the driver this package
depends on (SQLAlchemy 2.1 would otherwise pick psycopg 3, which is optional
here).  Name the driver to choose: ``postgresql+psycopg://`` works as well.
"""

from __future__ import annotations

import contextlib
import hashlib
import select
from collections.abc import Iterable, Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from ...exceptions import DatabaseUnavailable
from . import Dialect, Listener

#: SQLSTATEs that mean "another transaction got there first": retry.
_RETRYABLE = {
    "23505",  # unique_violation: (stream, version) taken
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
}


#: Connection-info key: this session runs with synchronous_commit off.
_RELAXED = "celery_eventstore.relaxed_commit"


def _lock_key(key: str) -> int:
    """A 63-bit advisory lock key for a name (collisions only cost some waiting)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


class PostgreSQLDialect(Dialect):
    name = "postgresql"
    supports_notify = True

    def normalize_url(self, url: sa.URL) -> sa.URL:
        if url.drivername == "postgresql":
            return url.set(drivername="postgresql+psycopg2")
        return url

    def engine_options(self, url: sa.URL) -> dict[str, Any]:
        # No pool_pre_ping: it costs a round trip per transaction.  A connection
        # that died with the server fails its statement, SQLAlchemy invalidates
        # the pool, and the caller's retry (Celery's reconnect) gets fresh ones.
        options: dict[str, Any] = {}
        if url.get_driver_name() == "psycopg2":
            # Batch UPDATE/DELETE executemany into few round trips, as INSERTs are.
            options["executemany_mode"] = "values_plus_batch"
        return options

    def configure(self, engine: sa.Engine) -> None:
        @sa.event.listens_for(engine, "checkout")
        def _checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
            # A pooled connection whose server restarted would fail its first
            # statement.  An idle connection has nothing to read unless the server
            # said goodbye ("terminating connection") or hung up, so one zero-timeout
            # select() finds it without a round trip; DisconnectionError makes the
            # pool discard it and connect afresh.
            if _has_input(dbapi_conn):
                raise sa.exc.DisconnectionError("the server closed this pooled connection")

        @sa.event.listens_for(engine, "rollback")
        def _rollback(conn: sa.Connection) -> None:
            # A SET made in a rolled-back transaction is undone with it.  (An
            # invalidated connection is replaced by a new session: nothing to undo,
            # and touching its info would try to reconnect mid-rollback.)
            if not conn.invalidated:
                conn.info.pop(_RELAXED, None)

    def nominate(self, select: sa.Select[Any], table: sa.Table) -> sa.Select[Any]:
        # SKIP LOCKED nominates rows no one else is claiming; the (stream, version)
        # key still arbitrates if two claimers reach the same stream.
        return select.with_for_update(skip_locked=True, of=table)

    def maintenance_warnings(self, conn: sa.Connection) -> list[str]:
        if conn.exec_driver_sql("SHOW autovacuum").scalar_one() == "off":
            return [
                "autovacuum is off: acked messages leave dead index entries that every "
                "claim steps over, and stale statistics can make claims sort every due "
                "message (see 'Vacuum and statistics' in the operations docs)"
            ]
        return []

    def set_durability(self, conn: sa.Connection, durable: bool) -> None:
        # Relaxed commits are lost only if the server itself crashes within
        # wal_writer_delay, and then only work whose loss means a redelivery
        # (claims, acks, renewals).  The setting stays on the session, so a
        # consumer's connection pays for the SET once, not per transaction.
        relaxed = conn.info.get(_RELAXED, False)
        if durable and relaxed:
            conn.exec_driver_sql("SET LOCAL synchronous_commit = on")
        elif not durable and not relaxed:
            conn.exec_driver_sql("SET synchronous_commit = off")
            conn.info[_RELAXED] = True

    def lock_stream(self, conn: sa.Connection, key: str) -> None:
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_lock_key(key))))

    def lock_log(self, conn: sa.Connection, table: sa.Table) -> None:
        name = conn.dialect.identifier_preparer.format_table(table)
        conn.exec_driver_sql(f"LOCK TABLE {name} IN EXCLUSIVE MODE")

    def lock_migrations(self, conn: sa.Connection, key: str) -> None:
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_lock_key(key))))

    def notify(self, conn: sa.Connection, channel: str, payloads: Iterable[str]) -> None:
        # pg_notify is transactional: listeners hear it only if we commit.
        for payload in sorted(set(payloads)):
            conn.execute(sa.select(sa.func.pg_notify(channel, payload)))

    def upsert(
        self, conn: sa.Connection, table: sa.Table, values: dict[str, Any], keys: tuple[str, ...]
    ) -> None:
        stmt = pg_insert(table).values(values)
        update = {k: stmt.excluded[k] for k in values if k not in keys}
        conn.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=update))

    def listener(self, engine: sa.Engine, channels: Iterable[str]) -> Listener:
        return NotifyListener(engine, channels)

    def clock_query(self) -> sa.Select[Any]:
        return sa.select(sa.extract("epoch", sa.func.clock_timestamp()))

    def is_conflict(self, exc: sa.exc.DBAPIError) -> bool:
        code = getattr(exc.orig, "pgcode", None) or getattr(exc.orig, "sqlstate", None)
        return code in _RETRYABLE


@contextlib.contextmanager
def _lost_on_error() -> Iterator[None]:
    """A LISTEN connection that fails has lost the server (it only ever waits):
    say so with the store's connection error, which Celery reconnects on."""
    try:
        yield
    except DatabaseUnavailable:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DatabaseUnavailable(f"lost the LISTEN connection to the database: {first}") from exc


def _has_input(dbapi_conn: Any) -> bool:
    """True when an idle connection's socket is readable (or already closed)."""
    try:
        fd = dbapi_conn.fileno()
    except Exception:  # noqa: BLE001 - the driver's "connection already closed"
        return True
    return _readable(fd, 0)


def _readable(fd: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``fd`` to be readable.  poll() where
    there is one: select() fails for descriptors past FD_SETSIZE (1024), which a
    busy worker process can reach."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(max(timeout, 0.0) * 1000))
    readable, _, _ = select.select([fd], [], [], timeout)
    return bool(readable)


class NotifyListener(Listener):
    """A dedicated autocommit connection that LISTENs on the store's channel.

    It is its own DBAPI connection, outside the pool: a pooled connection would
    be handed to other work and lose its LISTEN.  Works with psycopg2 and psycopg 3.
    """

    def __init__(self, engine: sa.Engine, channels: Iterable[str]) -> None:
        args, kwargs = engine.dialect.create_connect_args(engine.url)
        self._conn: Any = engine.dialect.connect(*args, **kwargs)
        self._psycopg2 = engine.dialect.driver == "psycopg2"
        if self._psycopg2:
            self._conn.set_isolation_level(0)
        else:
            self._conn.autocommit = True
        for channel in channels:
            quoted = '"' + channel.replace('"', '""') + '"'
            if self._psycopg2:
                with contextlib.closing(self._conn.cursor()) as cur:
                    cur.execute(f"LISTEN {quoted}")
            else:
                self._conn.execute(f"LISTEN {quoted}")

    def fileno(self) -> int:
        return int(self._conn.fileno())

    def poll(self) -> set[str]:
        with _lost_on_error():
            if self._psycopg2:
                self._conn.poll()
                payloads = {n.payload for n in self._conn.notifies}
                self._conn.notifies.clear()
                return payloads
            return {n.payload for n in self._conn.notifies(timeout=0)}

    def wait(self, timeout: float) -> set[str]:
        woken = self.poll()
        if woken or timeout <= 0:
            return woken
        with _lost_on_error():
            readable = _readable(self.fileno(), timeout)
        return self.poll() if readable else set()

    def close(self) -> None:
        try:
            self._conn.close()
        except Exception:  # noqa: BLE001 - closing a dead connection is not an error
            pass
