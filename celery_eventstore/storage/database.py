"""The database boundary: engine, transactions, durability, retries, the clock.

Everything the storage package sends to the database goes through a
:class:`Database`, and every driver error comes back out of it translated into
the package's own exceptions: nothing above this module sees ``sqlalchemy.exc``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import sqlalchemy as sa

from ..exceptions import (
    ConcurrencyConflict,
    DatabaseError,
    DatabaseUnavailable,
    InvalidURL,
)
from .borrowed import Lenders
from .dialects import Dialect, dialect_for

T = TypeVar("T")
logger = logging.getLogger(__name__)

#: How often a lost race is retried before ConcurrencyConflict reaches the caller.
CONFLICT_RETRIES = 20
#: How often the host/database clock offset is measured again.
CLOCK_REFRESH_SECONDS = 30.0


def parse_url(url: str | sa.URL) -> sa.URL:
    """A SQLAlchemy URL; an ``eventstore+`` broker URL prefix is accepted and dropped."""
    if isinstance(url, str) and url.startswith(BROKER_PREFIX):
        url = url[len(BROKER_PREFIX):]
    try:
        return sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        # The URL may hold a password: say what is wrong without echoing it.
        raise InvalidURL() from None


#: What a Celery broker or result backend URL starts with to name this package.
BROKER_PREFIX = "eventstore+"


def redact(url: str | sa.URL) -> str:
    """The URL with its password hidden, for messages and logs."""
    return parse_url(url).render_as_string(hide_password=True)


class Tx:
    """One write transaction: its connection, the time it decides with, the
    events it appended (for whoever watches commits), and what to run once it has
    committed (``after_commit``: None when it is joined to a caller's, whose
    commit we do not see).

    ``now`` is the database's clock, read once per transaction: by the
    transaction's first read of streams where the dialect can fold it in there
    (:meth:`clock_read`), else by a statement of its own the first time it is
    asked for (``start``, which also makes a ``relaxed`` commit skip the wait for
    the disk).
    """

    def __init__(
        self,
        conn: sa.Connection,
        now: float | None = None,
        *,
        start: Callable[[], float] | None = None,
        relaxed: bool = False,
        after_commit: list[Callable[[], None]] | None = None,
    ) -> None:
        self.conn = conn
        self._now = now
        self._start = start
        self.relaxed = relaxed
        self.appended: list[Any] = []
        self.after_commit = after_commit

    @property
    def now(self) -> float:
        if self._now is None:
            assert self._start is not None, "a transaction without a clock"
            self._now = self._start()
        return self._now

    @property
    def clock_wanted(self) -> bool:
        """Whether the clock is still to be read: the next read may bring it."""
        return self._now is None

    def clock_read(self, now: float) -> None:
        """The clock as a read of this transaction brought it (with the relaxed
        commit set where ``relaxed``)."""
        if self._now is None:
            self._now = now


class Database:
    """One database: the engine and the rules for talking to it.

    :param prepare: called before the first use of a connection (the schema check);
        a no-op once it has succeeded.
    """

    def __init__(
        self,
        url: sa.URL,
        *,
        clock: Callable[[], float] | None = None,
        async_commit: bool = True,
        engine_options: Mapping[str, Any] | None = None,
        prepare: Callable[[], None] = lambda: None,
    ) -> None:
        self.dialect: Dialect = dialect_for(url)
        #: The URL as given: it may name no driver (``postgresql://``).
        self.given_url = url
        self.url = self.dialect.normalize_url(url)
        self.async_commit = async_commit
        options = {**self.dialect.engine_options(self.url), **(engine_options or {})}
        try:
            self.engine = sa.create_engine(self.url, **options)
        except (sa.exc.ArgumentError, ImportError) as exc:
            raise InvalidURL(f"cannot use {redact(self.url)}: {exc}") from None
        self.dialect.configure(self.engine, url)
        #: Engines for callers' own DB-API connections (atomic enqueue).  Another
        #: driver's dialect is set up on a connection made with the application's
        #: connect_args (SSL, server options), not its pool settings.
        connect_args = (engine_options or {}).get("connect_args")

        def lender_options(url: sa.URL) -> dict[str, Any]:
            options = self.dialect.engine_options(url)
            if connect_args:
                options["connect_args"] = {**options.get("connect_args", {}), **connect_args}
            return options

        self.lenders = Lenders(self.engine, lender_options)
        self._prepare = prepare
        #: Called with the events of each transaction of our own once it commits.
        self.committed: list[Callable[[list[Any]], None]] = []
        self._clock = clock
        self._clock_offset: float | None = None
        self._clock_measured = 0.0

    def close(self) -> None:
        self.dialect.close()
        self.engine.dispose()

    def describe_driver(self) -> str:
        """The DB-API driver in use with its version, and, for a URL that names no
        driver, which one that means here and which one SQLAlchemy would pick."""
        name = self.url.get_driver_name()
        dbapi = self.engine.dialect.dbapi
        version = getattr(dbapi, "__version__", None) or getattr(dbapi, "sqlite_version", "")
        text = f"{name} {str(version).split(' ')[0]}".strip()
        given = self.given_url.drivername
        default = self.given_url.get_dialect().driver  # what sa.create_engine() picks
        if "+" in given or default == name:
            return text
        return (
            f"{text} ({given}:// names no driver: the store uses {name}, while "
            f"sa.create_engine('{given}://...') picks {default})"
        )

    def side_engine(self, url: sa.URL) -> sa.Engine:
        """An engine without a pool for ``url``, a second way into the same
        database (a LISTEN connection that bypasses a pooler)."""
        url = self.dialect.normalize_url(url)
        if dialect_for(url).name != self.dialect.name:
            raise InvalidURL(f"{redact(url)} is not a {self.dialect.name} URL")
        try:
            return sa.create_engine(url, poolclass=sa.pool.NullPool)
        except (sa.exc.ArgumentError, ImportError) as exc:
            raise InvalidURL(f"cannot use {redact(url)}: {exc}") from None

    def after_fork(self) -> None:
        """Drop pooled connections inherited from a parent process without closing them."""
        self.engine.dispose(close=False)

    # -- errors ----------------------------------------------------------------

    @contextlib.contextmanager
    def translate_errors(self) -> Iterator[None]:
        """Turn driver errors into the package's: the one place that sees them."""
        try:
            yield
        except sa.exc.DBAPIError as exc:
            if self.dialect.is_conflict(exc):
                raise ConcurrencyConflict(
                    f"lost a race with another writer: {_first_line(exc.orig)}"
                ) from exc
            if self.dialect.is_unavailable(exc):
                raise DatabaseUnavailable(
                    f"database {redact(self.url)} is unavailable: {_first_line(exc.orig)}"
                ) from exc
            raise DatabaseError(
                f"database {redact(self.url)} refused the operation: {_first_line(exc.orig)}"
            ) from exc
        except sa.exc.TimeoutError as exc:  # the pool had no connection to give
            raise DatabaseUnavailable(
                f"database {redact(self.url)} is unavailable: {_first_line(exc)}"
            ) from exc

    # -- transactions ----------------------------------------------------------

    @contextlib.contextmanager
    def write(
        self, connection: sa.Connection | None = None, *, durable: bool = True
    ) -> Iterator[Tx]:
        """A write transaction: our own, or joined to the caller's ``connection``.

        ``durable=False`` marks work whose loss only causes a redelivery: with
        ``async_commit`` its commit does not wait for the disk.  That is set for
        the one transaction, never on the session.  The transaction's ``now`` is
        the database's clock, read by its first statement.
        """
        self._prepare()
        with self.translate_errors():
            if connection is not None:
                with self.dialect.join(connection):
                    yield self._tx(connection, relaxed=False)
            else:
                after: list[Callable[[], None]] = []
                with self.engine.begin() as conn:
                    relaxed = not durable and self.async_commit
                    tx = self._tx(conn, relaxed=relaxed, after_commit=after)
                    yield tx
                self._committed(tx, after)

    @property
    def one_statement_commits(self) -> bool:
        """Whether :meth:`one_statement` runs without BEGIN and COMMIT."""
        return self.dialect.autocommits

    @contextlib.contextmanager
    def one_statement(self) -> Iterator[Tx]:
        """A durable write that is one statement, whole by itself: it commits as it
        runs, with no BEGIN or COMMIT round trip of its own (psycopg2 sends each
        apart).  Where the dialect cannot, an ordinary :meth:`write`.

        Every statement in it commits alone: run several only where each is whole
        by itself.
        """
        if not self.dialect.autocommits:
            with self.write() as tx:
                yield tx
            return
        self._prepare()
        after: list[Callable[[], None]] = []
        with self.translate_errors(), self.engine.connect() as conn:
            with self.dialect.autocommit(conn):
                tx = self._tx(conn, relaxed=False, after_commit=after)
                yield tx
        self._committed(tx, after)

    def _committed(self, tx: Tx, after: list[Callable[[], None]]) -> None:
        """What follows a commit of our own: its callbacks, then its watchers."""
        self.dialect.committed()
        for callback in after:
            callback()
        if tx.appended:
            self._announce(tx.appended)

    def _announce(self, appended: list[Any]) -> None:
        """Tell the watchers what a transaction committed.  A watcher's failure is
        logged, never raised: the commit has happened."""
        for watcher in list(self.committed):
            try:
                watcher(appended)
            except Exception:  # noqa: BLE001 - monitoring must not fail a write
                logger.exception("a commit watcher failed")

    @contextlib.contextmanager
    def borrow(self, dbapi_connection: Any, url: sa.URL) -> Iterator[sa.Connection]:
        """A ``Connection`` over a caller's DB-API connection (of ``url``'s driver)
        that runs statements and never controls its transaction (:mod:`.borrowed`)."""
        with self.translate_errors():
            lender = self.lenders.lender(url.drivername)
        with lender.lend(dbapi_connection) as conn:
            yield conn

    def _tx(
        self, conn: sa.Connection, *, relaxed: bool,
        after_commit: list[Callable[[], None]] | None = None,
    ) -> Tx:
        """A transaction whose clock is read now, or, where the dialect folds it
        into reads, by its first read (one round trip fewer for a write that
        reads before it decides)."""
        def start() -> float:
            return self._begin(conn, relaxed=relaxed)

        if self._clock is None and self.dialect.clock_in_reads:
            return Tx(conn, start=start, relaxed=relaxed, after_commit=after_commit)
        return Tx(conn, start(), start=start, relaxed=relaxed, after_commit=after_commit)

    def injected_now(self) -> float | None:
        """A test's clock, when one was given (else None: the database's decides)."""
        return None if self._clock is None else self._clock()

    def _begin(self, conn: sa.Connection, *, relaxed: bool) -> float:
        if self._clock is not None:  # a test's clock
            if relaxed:
                self.dialect.set_relaxed(conn)
            return self._clock()
        db_now = self.dialect.begin(conn, relaxed=relaxed)
        return time.time() if db_now is None else db_now

    @contextlib.contextmanager
    def read(self, *, streaming: bool = False) -> Iterator[sa.Connection]:
        """A read-only transaction (on SQLite it never waits for the write lock).

        Where the dialect can, each statement commits as it runs instead: no
        BEGIN and COMMIT round trips (psycopg2 sends each apart), and nothing
        lost, as a transaction at READ COMMITTED gives its statements no shared
        snapshot anyway.  A ``streaming`` read (a server-side cursor, which lives
        in a transaction) keeps one.
        """
        self._prepare()
        with (
            self.translate_errors(), self.engine.connect() as conn, self.dialect.reading(conn),
        ):
            if self.dialect.autocommits and not streaming:
                with self.dialect.autocommit(conn), conn.begin():
                    yield conn
                return
            with conn.begin():
                yield conn

    def retrying(self, attempt: Callable[[], T]) -> T:
        """Run ``attempt`` (one whole transaction) again while it loses races."""
        for tries in range(CONFLICT_RETRIES):
            try:
                return attempt()
            except ConcurrencyConflict:
                # Jittered backoff, so racers stop colliding in lock-step.
                time.sleep(random.uniform(0, 0.002 * 2 ** min(tries, 6)))
        raise ConcurrencyConflict(f"gave up after {CONFLICT_RETRIES} lost races")

    # -- the clock ---------------------------------------------------------------

    def now(self) -> float:
        """Epoch seconds by the store's clock (the database's on PostgreSQL)."""
        if self._clock is not None:
            return self._clock()
        local = time.time()
        if self._clock_offset is None or local - self._clock_measured > CLOCK_REFRESH_SECONDS:
            # Built only when measured: a Select costs more than the rest of a call.
            query = self.dialect.clock_query()
            if query is None:
                return local
            with self.translate_errors(), self.engine.connect() as conn:
                before = time.time()
                db_now = float(conn.execute(query).scalar_one())
                after = time.time()
            self._clock_offset = db_now - (before + after) / 2
            self._clock_measured = after
            local = after
        return local + self._clock_offset

    def clock_skew(self) -> float:
        """Database clock minus this host's clock, in seconds (0 on SQLite)."""
        self._clock_offset = None
        saved, self._clock = self._clock, None
        try:
            self.now()
        finally:
            self._clock = saved
        return self._clock_offset or 0.0


def _first_line(exc: BaseException | None) -> str:
    text = str(exc or "").strip()
    return text.splitlines()[0] if text else type(exc).__name__
