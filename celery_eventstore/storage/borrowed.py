"""Writing through a connection the application owns (atomic enqueue beyond SQLAlchemy).

An application not built on SQLAlchemy (Django, a plain psycopg2, psycopg 3 or
sqlite3 connection) hands atomic enqueue its own DB-API connection.  The store then
runs its statements inside whatever transaction or savepoint the application has
open, and does nothing else to that connection: it never begins, commits or rolls
back its transaction, never changes its isolation level or autocommit, never
registers type adapters on it and never closes it.

SQLAlchemy's engine does several of those to a connection it is given: the dialect's
first-connect initialisation queries the server and then rolls back, its on-connect
hook registers type casters, the pool resets a returned connection with a rollback,
and closing a ``Connection`` rolls back the transaction it began.  So a borrowed
connection runs through a :class:`Lender`'s engine instead:

* its dialect was initialised on a connection of the store's own;
* its pool has no event hooks and no reset on return, and hands out the borrowed
  connection behind a :class:`TransactionGuard`, which ignores ``commit``,
  ``rollback`` and ``close`` (what SQLAlchemy calls when its ``Connection`` ends)
  and refuses to change the connection's attributes.

Savepoints, the store's own rollback scope on PostgreSQL, are SQL statements and go
through the guard like every other statement.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

#: The borrowed connection the pool hands out while a Lender lends it.
_lent: contextvars.ContextVar[TransactionGuard | None] = contextvars.ContextVar(
    "celery_eventstore_lent", default=None
)

#: What a borrowed connection's transaction looks like to the store.
OPEN = "open"  # a transaction is open, or the driver opens one with the next statement
NONE = "none"  # autocommit: each statement would commit on its own
ABORTED = "aborted"  # PostgreSQL refuses every statement until the caller rolls back


@dataclass(frozen=True)
class ConnectionInfo:
    """What the store needs to know about a caller's DB-API connection."""

    #: Where it is connected, with its driver (``postgresql+psycopg2``, ...).
    url: sa.URL
    #: :data:`OPEN`, :data:`NONE` or :data:`ABORTED`.
    transaction: str


class TransactionGuard:
    """A caller's DB-API connection as the store may use it: statements only."""

    __slots__ = ("_dbapi_connection",)

    def __init__(self, dbapi_connection: Any) -> None:
        object.__setattr__(self, "_dbapi_connection", dbapi_connection)

    def commit(self) -> None:
        """The caller commits, not the store."""

    def rollback(self) -> None:
        """The caller rolls back, not the store (SQLAlchemy calls this when its
        ``Connection`` closes)."""

    def close(self) -> None:
        """The caller's connection outlives the store's use of it."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dbapi_connection, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the store may not set {name!r} on the caller's connection")


class Lender:
    """Runs the store's statements on borrowed connections of one driver.

    :param url: the store's database, with the borrowed connections' driver.
    :param dialect: a dialect of that driver, already initialised.
    """

    def __init__(self, url: sa.URL, dialect: sa.engine.Dialect) -> None:
        pool = sa.pool.NullPool(_guard, reset_on_return=None, dialect=dialect)
        self.engine = sa.Engine(pool, dialect, url)

    @contextlib.contextmanager
    def lend(self, dbapi_connection: Any) -> Iterator[sa.Connection]:
        """A SQLAlchemy ``Connection`` over ``dbapi_connection`` for the block."""
        token = _lent.set(TransactionGuard(dbapi_connection))
        try:
            with self.engine.connect() as conn:
                yield conn
        finally:
            _lent.reset(token)


def _guard() -> TransactionGuard:
    guard = _lent.get()
    if guard is None:
        raise RuntimeError("a borrowed connection was asked for outside Lender.lend()")
    return guard


class Lenders:
    """One :class:`Lender` per driver, made on first use."""

    def __init__(
        self, store_engine: sa.Engine, engine_options: Callable[[sa.URL], dict[str, Any]]
    ) -> None:
        self._store_engine = store_engine
        self._engine_options = engine_options
        self._lenders: dict[str, Lender] = {}
        self._lock = threading.Lock()

    def lender(self, drivername: str) -> Lender:
        with self._lock:
            lender = self._lenders.get(drivername)
            if lender is None:
                url = self._store_engine.url.set(drivername=drivername)
                lender = self._lenders[drivername] = Lender(url, self._initialised(url))
            return lender

    def _initialised(self, url: sa.URL) -> sa.engine.Dialect:
        """A dialect for ``url``'s driver, initialised on a connection of our own
        (never on the caller's: initialising ends with a rollback)."""
        if url.drivername == self._store_engine.url.drivername:
            with self._store_engine.connect():
                return self._store_engine.dialect
        options = self._engine_options(url)
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool, **options)
        try:
            with engine.connect():
                return engine.dialect
        finally:
            engine.dispose()
