"""PostgreSQL: SKIP LOCKED claims, advisory locks, the server's clock.

A plain ``postgresql://`` URL is pinned to psycopg2, the driver this package
depends on (SQLAlchemy 2.1 would otherwise pick psycopg 3, which is optional
here).  Name the driver to choose: ``postgresql+psycopg://`` works as well.

Statements are prepared on the server after five runs on a connection (planning
costs the server more than running the store's hottest statements): psycopg 3
does it by itself, and for psycopg2 the store does it with SQL
(:mod:`.server_prepared`); ``?prepare_threshold=N`` (``none``: never) in the URL
says otherwise.  A prepared statement lives on one server session, which a pooler
in transaction mode does not keep for a client, so where the URL does not ask,
a connection that reaches a pooler (:func:`_through_pooler`) prepares nothing.
Nothing else here keeps state on a session, so every statement works through
PgBouncer's transaction pooling: durability is set per transaction, advisory
locks are transaction-scoped.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, aggregate_order_by
from sqlalchemy.dialects.postgresql import insert as pg_insert

from ..borrowed import ABORTED, NONE, OPEN, ConnectionInfo
from ..notifiers.postgresql_notify import readable
from . import Dialect
from .server_prepared import ServerPrepared, never_prepare

logger = logging.getLogger(__name__)

#: SQLSTATEs that mean "another transaction got there first": retry.
_RETRYABLE = {
    "23505",  # unique_violation: (stream, version) taken
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "26000",  # invalid_sql_statement_name: a prepared statement the session lost
    #           (server_prepared forgets them all; the retry prepares again)
}

#: SQLSTATEs that mean "the server cannot serve us now": wait and reconnect.  The
#: drivers raise some of them as errors that are not OperationalError (read-only
#: is InternalError), which the generic rule would take for a refusal.
_UNAVAILABLE = {
    "25006",  # read_only_sql_transaction: a primary failing over, a standby,
    #           default_transaction_read_only switched on for maintenance
    "57P01",  # admin_shutdown
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now: starting up, shutting down, in recovery
    "53300",  # too_many_connections
}
#: libpq's PQtransactionStatus values (both drivers' ``info.transaction_status``).
_IDLE, _IN_ERROR = 0, 3
#: The drivers whose connections atomic enqueue accepts: module, connection class.
_DRIVERS = {"psycopg2": "extensions.connection", "psycopg": "Connection"}

#: SQLSTATE class of every connection exception (08000, 08003, 08006, ...).
_CONNECTION_EXCEPTION_CLASS = "08"


_CLOCK = "SELECT extract(epoch FROM clock_timestamp())"
#: Relaxed commits are lost only if the server itself crashes within
#: wal_writer_delay, and then only work whose loss means a redelivery.
_RELAXED_BEGIN = (
    "SELECT extract(epoch FROM clock_timestamp())"
    " FROM (SELECT set_config('synchronous_commit', 'off', true)) AS relaxed"
)


#: psycopg 3's connection parameter: statements run this many times are prepared
#: on the server; None never prepares.
PREPARE_THRESHOLD = "prepare_threshold"
#: Runs before a statement is prepared when the URL does not say: psycopg 3's own
#: default, which the store follows for psycopg2.
DEFAULT_PREPARE_THRESHOLD = 5


def _threshold(value: str | tuple[str, ...]) -> int | None:
    """``prepare_threshold`` from a URL: a number, or ``none`` (never prepare)."""
    text = value[-1] if isinstance(value, tuple) else value
    if text.strip().lower() in ("", "none", "null", "off"):
        return None
    return int(text)


def _through_pooler(dbapi_conn: Any) -> bool:
    """Whether a new connection reaches the server through a pooler, which may run
    each transaction on another server session: the session that answers is not
    the one whose cancel key the connection was given (PgBouncer hands out keys of
    its own).  One round trip, once per connection."""
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    finally:
        cursor.close()
    dbapi_conn.rollback()
    return bool(pid != dbapi_conn.info.backend_pid)


def _lock_key(key: str) -> int:
    """A 63-bit advisory lock key for a name (collisions only cost some waiting)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


class PostgreSQLDialect(Dialect):
    name = "postgresql"
    clock_in_reads = True
    can_partition = True
    writes_in_with = True
    lateral_joins = True
    #: Runs before a statement is prepared (None: never), and whether the
    #: connections were found to reach a pooler (set by :meth:`configure`).
    _prepare_after: int | None = None
    _pooled = False

    def normalize_url(self, url: sa.URL) -> sa.URL:
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg2")
        if url.get_driver_name() == "psycopg2" and PREPARE_THRESHOLD in url.query:
            url = url.difference_update_query([PREPARE_THRESHOLD])
        return url

    @property
    def prepares(self) -> bool:
        return self._prepare_after is not None and not self._pooled

    def describe_preparing(self) -> str | None:
        if self._pooled:
            return "not prepared: connections reach a pooler (prepare_threshold decides)"
        if self._prepare_after is None:
            return "not prepared (prepare_threshold=none)"
        after = self._prepare_after
        runs = "at its first run" if after == 0 else f"after {after} runs"
        return f"prepared on the server, each {runs} on a connection"

    def same_database(self, a: sa.URL, b: sa.URL) -> bool:
        def where(url: sa.URL) -> tuple[str, int, str | None]:
            # No host, or a Unix socket's directory (what a connection made through
            # the socket reports as its host), is this machine's server.
            host = url.host or ""
            local = not host or host.startswith("/")
            return ("localhost" if local else host, url.port or 5432, url.database)

        return where(a) == where(b)

    def engine_options(self, url: sa.URL) -> dict[str, Any]:
        # No pool_pre_ping: it costs a round trip per transaction.  A connection
        # that died with the server fails its statement, SQLAlchemy invalidates
        # the pool, and the caller's retry (Celery's reconnect) gets fresh ones.
        options: dict[str, Any] = {}
        if url.get_driver_name() == "psycopg2":
            # Batch UPDATE/DELETE executemany into few round trips, as INSERTs are.
            options["executemany_mode"] = "values_plus_batch"
        if PREPARE_THRESHOLD in url.query:
            options["connect_args"] = {PREPARE_THRESHOLD: _threshold(url.query[PREPARE_THRESHOLD])}
        return options

    def configure(self, engine: sa.Engine, given: sa.URL) -> None:
        driver = engine.url.get_driver_name()
        asked = PREPARE_THRESHOLD in given.query
        threshold = (
            _threshold(given.query[PREPARE_THRESHOLD]) if asked else DEFAULT_PREPARE_THRESHOLD
        )
        self._prepare_after, self._pooled = threshold, False
        if threshold is not None and driver == "psycopg2":
            ServerPrepared(threshold).install(engine)  # psycopg 3 reads the parameter itself
        if threshold is not None and not asked:

            @sa.event.listens_for(engine, "connect")
            def _unless_pooled(dbapi_conn: Any, record: Any) -> None:
                # Runs after ServerPrepared's own "connect" listener (added first).
                if not _through_pooler(dbapi_conn):
                    return
                if driver == "psycopg2":
                    never_prepare(record)
                else:
                    dbapi_conn.prepare_threshold = None
                if not self._pooled:  # said once per store
                    self._pooled = True
                    logger.info(
                        "%s reaches a pooler, not one server session: statements are"
                        " not prepared on the server (a prepare_threshold in the URL"
                        " decides otherwise)", engine.url.render_as_string(hide_password=True),
                    )

        @sa.event.listens_for(engine, "checkout")
        def _checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
            # A pooled connection whose server restarted would fail its first
            # statement.  An idle connection has nothing to read unless the server
            # said goodbye ("terminating connection") or hung up, so one zero-timeout
            # select() finds it without a round trip; DisconnectionError makes the
            # pool discard it and connect afresh.
            if _has_input(dbapi_conn):
                raise sa.exc.DisconnectionError("the server closed this pooled connection")

    @classmethod
    def describe(cls, dbapi_connection: Any) -> ConnectionInfo | None:
        driver = _driver_of(dbapi_connection)
        if driver is None:
            return None
        info = dbapi_connection.info  # the driver's cached connection parameters
        url = sa.URL.create(
            f"postgresql+{driver}",
            username=info.user,
            host=info.host,
            port=int(info.port) if info.port else None,
            database=info.dbname,
        )
        status = int(info.transaction_status)
        if status == _IN_ERROR:
            return ConnectionInfo(url, ABORTED)
        # Outside autocommit the driver begins a transaction with the next statement.
        idle = status == _IDLE and dbapi_connection.autocommit
        return ConnectionInfo(url, NONE if idle else OPEN)

    autocommits = True

    @contextlib.contextmanager
    def autocommit(self, conn: sa.Connection) -> Iterator[None]:
        # The driver's own switch, not SQLAlchemy's isolation level: that one is
        # undone with a SET statement when the connection goes back to the pool,
        # the very round trip this saves.  Both drivers send nothing to switch,
        # and a rollback outside a transaction sends nothing either.
        dbapi_connection = conn.connection.dbapi_connection
        assert dbapi_connection is not None
        dbapi_connection.autocommit = True
        try:
            yield
        finally:
            with contextlib.suppress(Exception):  # a lost connection is discarded
                dbapi_connection.autocommit = False

    def nominate(self, select: sa.Select[Any], table: sa.Table) -> sa.Select[Any]:
        # SKIP LOCKED nominates rows no one else is claiming; the (stream, version)
        # key still arbitrates if two claimers reach the same stream.
        return select.with_for_update(skip_locked=True, of=table)

    def each_of(
        self, select: sa.Select[Any], column: sa.ColumnElement[Any], values: str,
        order_by: Sequence[str],
    ) -> sa.Select[Any]:
        # One lookup per value (a LATERAL join on the unnested list) rather than
        # `IN (...)`: without statistics (a log loaded in bulk, autovacuum not
        # come round yet, or off) the planner takes a list of a hundred stream
        # ids to match half the table and reads all of it.  The ORDER BY keeps
        # the subquery from being flattened into a join that could do the same.
        wanted = sa.func.unnest(sa.bindparam(values, type_=ARRAY(column.type))).table_valued(
            "value"
        ).render_derived(with_types=False)
        each = (
            select.where(column == wanted.c.value)
            .order_by(*(select.selected_columns[c] for c in order_by))
            .lateral()
        )
        return (
            sa.select(*each.c)
            .select_from(wanted.join(each, sa.true()))
            .order_by(*(each.c[c] for c in order_by))
        )

    def rows_of(self, columns: Sequence[sa.Column[Any]], prefix: str) -> sa.FromClause | None:
        # unnest() of several arrays zips them into rows, in the arrays' order.
        arrays = [sa.bindparam(prefix + c.name, type_=ARRAY(c.type)) for c in columns]
        return (
            sa.func.unnest(*arrays).table_valued(*(c.name for c in columns))
            .render_derived(with_types=False)
        )

    def json_rows(
        self, fields: Mapping[str, sa.ColumnElement[Any]],
        order_by: Sequence[sa.ColumnElement[Any]],
    ) -> sa.ColumnElement[Any] | None:
        members = []
        for name, value in fields.items():
            members += [sa.literal_column(f"'{name}'"), value]
        return sa.func.json_agg(
            aggregate_order_by(sa.func.json_build_object(*members), *order_by)
        )

    def one_of(self, column: sa.ColumnElement[Any], values: str) -> sa.ColumnElement[bool]:
        # One array parameter (what IN becomes in the planner anyway).
        return column == sa.any_(sa.bindparam(values, type_=ARRAY(column.type)))

    def json_field(self, column: sa.ColumnElement[Any], key: str) -> sa.ColumnElement[str]:
        return column.op("->>", return_type=sa.Text)(sa.literal_column(f"'{key}'"))

    def blank_json_field(
        self, column: sa.ColumnElement[Any], key: str, where: sa.ColumnElement[bool]
    ) -> sa.ColumnElement[Any]:
        # jsonb_set without create_missing replaces a member only where it exists;
        # on a scalar or an array it would fail the whole read, hence the type test.
        blanked = sa.func.jsonb_set(
            column, sa.literal_column(f"'{{{key}}}'"), sa.literal_column("'null'::jsonb"),
            sa.false(), type_=column.type,
        )
        is_object = sa.func.jsonb_typeof(column) == "object"
        return sa.case((sa.and_(where, is_object), blanked), else_=column)

    def json_from_text(self, text: sa.ColumnElement[Any], json_type: Any) -> sa.ColumnElement[Any]:
        return sa.cast(text, json_type)  # text is not assignable to jsonb

    def maintenance_warnings(self, conn: sa.Connection) -> list[str]:
        if conn.exec_driver_sql("SHOW autovacuum").scalar_one() == "off":
            return [
                "autovacuum is off: acked messages leave dead index entries that every "
                "claim steps over, and stale statistics can make claims sort every due "
                "message (see 'Vacuum and statistics' in the operations docs)"
            ]
        return []

    def begin(self, conn: sa.Connection, *, relaxed: bool) -> float:
        # One round trip for both: the durability of this transaction alone
        # (set_config(..., true) is SET LOCAL, undone at commit and rollback, so
        # it cannot leak into the next transaction of a pooled session or a
        # PgBouncer client), and the server's clock, which decides every lease.
        sql = _RELAXED_BEGIN if relaxed else _CLOCK
        return float(conn.exec_driver_sql(sql).scalar_one())

    def clock_expression(self) -> sa.ColumnElement[Any]:
        return sa.extract("epoch", sa.func.clock_timestamp())

    def clock_columns(self, relaxed: sa.ColumnElement[bool]) -> list[sa.ColumnElement[Any]]:
        # As begin(), in the read: set_config(..., true) is SET LOCAL, and the
        # setting is only consulted at commit, so setting it late is as good.
        return [
            sa.extract("epoch", sa.func.clock_timestamp()).label("tx_clock"),
            *self.relaxed_columns(relaxed),
        ]

    def relaxed_columns(self, relaxed: sa.ColumnElement[bool]) -> list[sa.ColumnElement[Any]]:
        return [
            sa.case(
                (relaxed, sa.func.set_config("synchronous_commit", "off", sa.true())),
            ).label("tx_relaxed"),
        ]

    def set_relaxed(self, conn: sa.Connection) -> None:
        conn.exec_driver_sql(_RELAXED_BEGIN)

    def lock_stream(self, conn: sa.Connection, key: str) -> None:
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_lock_key(key))))

    def lock_streams(self, conn: sa.Connection, keys: Sequence[str], *, shared: bool) -> None:
        # unnest reads an array in its order: sorted keys, one lock order for all.
        lock = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
        ordered = sorted({_lock_key(k) for k in keys})
        conn.execute(
            sa.text(f"SELECT count({lock}(k)) FROM unnest(CAST(:keys AS bigint[])) AS k"),
            {"keys": ordered},
        )

    def partitioned(self, conn: sa.Connection, table: sa.Table) -> bool:
        name = conn.dialect.identifier_preparer.format_table(table)
        kind = conn.execute(
            sa.text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:name)"),
            {"name": name},
        ).scalar()
        return kind == "p"

    def lock_log(self, conn: sa.Connection, table: sa.Table) -> None:
        name = conn.dialect.identifier_preparer.format_table(table)
        conn.exec_driver_sql(f"LOCK TABLE {name} IN EXCLUSIVE MODE")

    def lock_migrations(self, conn: sa.Connection, key: str) -> None:
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_lock_key(key))))

    def upsert(
        self, table: sa.Table, columns: Sequence[str], keys: Sequence[str]
    ) -> sa.Executable:
        stmt = pg_insert(table).values({c: sa.bindparam(c) for c in columns})
        update = {c: stmt.excluded[c] for c in columns if c not in keys}
        return stmt.on_conflict_do_update(index_elements=list(keys), set_=update)

    def clock_query(self) -> sa.Select[Any]:
        return sa.select(sa.extract("epoch", sa.func.clock_timestamp()))

    def is_conflict(self, exc: sa.exc.DBAPIError) -> bool:
        return _sqlstate(exc) in _RETRYABLE

    def is_unavailable(self, exc: sa.exc.DBAPIError) -> bool:
        code = _sqlstate(exc)
        if code in _UNAVAILABLE or (code or "").startswith(_CONNECTION_EXCEPTION_CLASS):
            return True
        return super().is_unavailable(exc)


def _sqlstate(exc: sa.exc.DBAPIError) -> str | None:
    """The server's SQLSTATE: ``pgcode`` on psycopg2, ``sqlstate`` on psycopg 3."""
    code = getattr(exc.orig, "pgcode", None) or getattr(exc.orig, "sqlstate", None)
    return code if isinstance(code, str) else None


def _driver_of(dbapi_connection: Any) -> str | None:
    """``psycopg2`` or ``psycopg`` for their connections (drivers not imported by
    the application cannot have made this one)."""
    for name, path in _DRIVERS.items():
        cls: Any = sys.modules.get(name)
        for part in path.split("."):
            cls = getattr(cls, part, None)
        if isinstance(cls, type) and isinstance(dbapi_connection, cls):
            return name
    return None


def _has_input(dbapi_conn: Any) -> bool:
    """True when an idle connection's socket is readable (or already closed)."""
    try:
        fd = dbapi_conn.fileno()
    except Exception:  # noqa: BLE001 - the driver's "connection already closed"
        return True
    return readable(fd, 0)
