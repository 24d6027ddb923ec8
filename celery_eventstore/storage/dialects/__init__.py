"""What differs between databases, one small module each.

A :class:`Dialect` is the only place that knows which database it talks to:
engine set-up, how claims nominate rows, upserts, locks, durability, the
database clock, and which driver errors mean "lost a race" or "the database is
not serving writes now".  Wake-ups are a seam of their own
(:mod:`..notifiers`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from ...exceptions import UnsupportedDatabase
from ..borrowed import ConnectionInfo
from ..execution import execute_rows


class Dialect:
    """The defaults are portable SQL; subclasses override what their database needs."""

    name = "generic"
    #: One writer at a time for the whole database (SQLite): a transaction kept
    #: open while other connections of the same process write would deadlock.
    single_writer = False
    #: :meth:`join` can roll back our part alone (a savepoint).
    atomic_join = True
    #: A stream read can bring the transaction's clock (:meth:`clock_columns`).
    clock_in_reads = False
    #: Seconds a long job of many transactions (prune) leaves between them, so
    #: writers waiting for a single-writer database's lock get it.
    writer_pause = 0.0
    #: The log can be partitioned by day (``partitioned_log``).
    can_partition = False
    #: A subquery in ``FROM`` can refer to the tables before it (``LATERAL``).
    lateral_joins = False
    #: A statement can write in its ``WITH`` clauses (data-modifying CTEs): an
    #: event and its derived rows can then be one statement (:mod:`..single_append`).
    writes_in_with = False
    @property
    def prepares(self) -> bool:
        """Whether the engine's statements are prepared on the server (known once
        :meth:`configure` ran, and where it depends on them, a connection was
        made): a statement whose generic plan the server would not keep is then
        planned on every run, which costs more than it saves."""
        return False

    def describe_preparing(self) -> str | None:
        """Whether and when statements are prepared on the server, as ``check``
        prints it (None: the database has no server)."""
        return None

    def normalize_url(self, url: sa.URL) -> sa.URL:
        return url

    def same_database(self, a: sa.URL, b: sa.URL) -> bool:
        """Whether two URLs of this dialect reach the same database."""
        return (a.host or "localhost", a.port, a.database) == (
            b.host or "localhost", b.port, b.database
        )

    def engine_options(self, url: sa.URL) -> dict[str, Any]:
        return {}

    def configure(self, engine: sa.Engine, given: sa.URL) -> None:
        """Install event hooks on a new engine, made for the URL as ``given``."""

    def committed(self) -> None:
        """A transaction of the store's own has committed (background upkeep)."""

    def close(self) -> None:
        """The store is closing: stop any upkeep of the dialect's own."""

    @contextlib.contextmanager
    def reading(self, conn: sa.Connection) -> Iterator[sa.Connection]:
        """``conn`` (not yet begun) for a read-only transaction."""
        yield conn

    #: :meth:`autocommit` runs statements that commit as they run.
    autocommits = False

    @contextlib.contextmanager
    def autocommit(self, conn: sa.Connection) -> Iterator[None]:
        """Make each statement on ``conn`` a transaction of its own (no BEGIN, no
        COMMIT: a round trip each where the driver sends them apart), until the
        block ends.  Only where :attr:`autocommits`."""
        raise NotImplementedError
        yield

    @contextlib.contextmanager
    def join(self, connection: sa.Connection) -> Iterator[sa.Connection]:
        """Run our writes inside the caller's open transaction.

        A savepoint lets a lost race roll back our part alone and retry, leaving
        the caller's transaction intact.
        """
        with connection.begin_nested():
            yield connection

    @classmethod
    def describe(cls, dbapi_connection: Any) -> ConnectionInfo | None:
        """Where a caller's DB-API connection of this database is connected and the
        state of its transaction, without changing it; None for another driver."""
        return None

    def nominate(self, select: sa.Select[Any], table: sa.Table) -> sa.Select[Any]:
        """Make a claim's candidate query safe against concurrent claimers."""
        return select

    def upsert(
        self, table: sa.Table, columns: Sequence[str], keys: Sequence[str]
    ) -> sa.Executable:
        """A statement inserting a row of ``columns`` (bound by name), or updating the
        row whose ``keys`` already exist."""
        raise NotImplementedError

    def each_of(
        self, select: sa.Select[Any], column: sa.ColumnElement[Any], values: str,
        order_by: Sequence[str],
    ) -> sa.Select[Any]:
        """``select``'s rows whose ``column`` is one of the list parameter ``values``,
        sorted by the columns named ``order_by``, each value looked up by an index
        whatever the planner knows of the table."""
        where = self.one_of(column, values)
        return select.where(where).order_by(*(select.selected_columns[c] for c in order_by))

    def rows_of(self, columns: Sequence[sa.Column[Any]], prefix: str) -> sa.FromClause | None:
        """Rows bound as one list parameter per column (``prefix`` + the column's
        name, equally long lists), as a subquery with those columns: a statement
        over many rows whose shape does not depend on how many.  None where the
        database has no such thing (then the rows go one by one, or in a batch)."""
        return None

    def json_rows(
        self, fields: Mapping[str, sa.ColumnElement[Any]],
        order_by: Sequence[sa.ColumnElement[Any]],
    ) -> sa.ColumnElement[Any] | None:
        """An aggregate of the rows it runs over as one JSON array of objects
        (``fields``: member name -> value), in ``order_by`` order, NULL over no
        row: many rows in one column of one row.  None where the database has
        no such aggregate."""
        return None

    def one_of(self, column: sa.ColumnElement[Any], values: str) -> sa.ColumnElement[bool]:
        """``column`` is one of the list parameter ``values`` (a ``list``), for a
        statement on the hot path: an ``IN`` whose placeholders SQLAlchemy renders
        anew on every call (an "expanding" parameter) costs more Python than the
        rest of the statement's execution, so a dialect binds the list as one value."""
        return column.in_(sa.bindparam(values, expanding=True))

    def json_field(self, column: sa.ColumnElement[Any], key: str) -> sa.ColumnElement[str]:
        """A text field of a JSON column, written exactly as the indexes on it are
        (see ``CANVAS_LINK_INDEXES`` in the schema), so that the planner uses them."""
        field: sa.ColumnElement[str] = column[key].as_string()
        return field

    def blank_json_field(
        self, column: sa.ColumnElement[Any], key: str, where: sa.ColumnElement[bool]
    ) -> sa.ColumnElement[Any]:
        """A JSON column's value with its member ``key`` replaced by ``null`` on the
        rows matching ``where`` (a key it lacks stays missing, and a value that is not
        an object comes back as it is, so a corrupt row still reads as corrupt)."""
        return column

    def json_from_text(self, text: sa.ColumnElement[Any], json_type: Any) -> sa.ColumnElement[Any]:
        """A JSON column's value from SQL text holding JSON (a bulk copy)."""
        return sa.type_coerce(text, json_type)

    def maintenance_warnings(self, conn: sa.Connection) -> list[str]:
        """Server settings that will hurt the store, in words for an operator."""
        return []

    def begin(self, conn: sa.Connection, *, relaxed: bool) -> float | None:
        """The first statement of a transaction: make its commit skip the wait for
        the disk when ``relaxed`` (for this transaction only: nothing is left on
        the session), and return the database's clock in epoch seconds, or None
        where the database has no clock of its own (then the host's is the one)."""
        return None

    def clock_columns(self, relaxed: sa.ColumnElement[bool]) -> list[sa.ColumnElement[Any]]:
        """Columns that make a transaction's first read do :meth:`begin`'s work
        (``tx_clock``: the database's clock in epoch seconds; the commit relaxed
        where the bound ``relaxed`` is true), saving its round trip.  Evaluated
        for each row read: a read that finds nothing leaves it to :meth:`begin`."""
        return [sa.null().label("tx_clock")]

    def relaxed_columns(self, relaxed: sa.ColumnElement[bool]) -> list[sa.ColumnElement[Any]]:
        """Columns that relax the transaction's commit where the bound ``relaxed``
        is true, as :meth:`begin` does (none where the commit cannot be relaxed
        per transaction)."""
        return []

    def insert_numbered(
        self, conn: sa.Connection, returning: sa.Executable, plain: sa.Executable,
        rows: Sequence[dict[str, Any]],
    ) -> list[int]:
        """Insert ``rows`` into the log and return their positions, in the order of
        ``rows`` (``returning`` reads them back; ``plain`` inserts without)."""
        return list(execute_rows(conn, returning, rows).scalars().all())

    def clock_expression(self) -> sa.ColumnElement[Any] | None:
        """The database's clock in epoch seconds as SQL, where a statement that
        writes may take its time from it (one publish in one statement); None
        where the host's clock is the store's."""
        return None

    def lock_stream(self, conn: sa.Connection, key: str) -> None:
        """Make other writers of one stream wait for this transaction instead of
        losing the version race after doing the same work (hot streams: chords)."""

    def lock_streams(self, conn: sa.Connection, keys: Sequence[str], *, shared: bool) -> None:
        """Take a lock per name until the transaction ends, shared (many holders)
        or not (one), in one order whatever the caller's, so takers never deadlock."""

    def partitioned(self, conn: sa.Connection, table: sa.Table) -> bool:
        """Whether ``table`` is partitioned (PostgreSQL declarative partitioning)."""
        return False

    def lock_log(self, conn: sa.Connection, table: sa.Table) -> None:
        """Hold off writers to the log for the rest of the transaction (rebuild)."""

    def lock_migrations(self, conn: sa.Connection, key: str) -> None:
        """Serialise concurrent migrations of the same schema."""

    def clock_query(self) -> sa.Select[Any] | None:
        """A query for the database's clock in epoch seconds, or None to use the host's."""
        return None

    def set_relaxed(self, conn: sa.Connection) -> None:
        """Make this transaction's commit skip the wait for the disk (only this one)."""

    def is_conflict(self, exc: sa.exc.DBAPIError) -> bool:
        """True when the error means another transaction won a race; retry."""
        return isinstance(exc, sa.exc.IntegrityError)

    def is_unavailable(self, exc: sa.exc.DBAPIError) -> bool:
        """True when the error means the database cannot serve us now (gone, restarting,
        read-only, out of connections): callers should wait and try again."""
        return bool(exc.connection_invalidated) or (
            isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError))
            and not self.is_conflict(exc)
        )


def dialect_for(url: sa.URL) -> Dialect:
    backend = url.get_backend_name()
    if backend == "postgresql":
        from .postgresql import PostgreSQLDialect

        return PostgreSQLDialect()
    if backend == "sqlite":
        from .sqlite import SQLiteDialect

        return SQLiteDialect()
    raise UnsupportedDatabase(
        f"unsupported database {backend!r}: the event store runs on postgresql and sqlite"
    )


def describe_connection(dbapi_connection: Any) -> ConnectionInfo | None:
    """:meth:`Dialect.describe` by whichever dialect knows the connection's driver."""
    from .postgresql import PostgreSQLDialect
    from .sqlite import SQLiteDialect

    for dialect in (PostgreSQLDialect, SQLiteDialect):
        info = dialect.describe(dbapi_connection)
        if info is not None:
            return info
    return None
