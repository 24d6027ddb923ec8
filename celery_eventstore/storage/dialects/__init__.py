"""What differs between databases, one small module each.

A :class:`Dialect` is the only place that knows which database it talks to:
engine set-up, how claims nominate rows, how committed work wakes consumers,
the database clock, and which driver errors mean "lost a race".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import sqlalchemy as sa

from ...exceptions import UnsupportedDatabase


class Dialect:
    """The defaults are portable SQL; subclasses override what their database needs."""

    name = "generic"
    #: Whether LISTEN/NOTIFY style wake-ups exist.
    supports_notify = False
    #: One writer at a time for the whole database (SQLite): a transaction kept
    #: open while other connections of the same process write would deadlock.
    single_writer = False

    def normalize_url(self, url: sa.URL) -> sa.URL:
        return url

    def engine_options(self, url: sa.URL) -> dict[str, Any]:
        return {}

    def configure(self, engine: sa.Engine) -> None:
        """Install event hooks on a new engine."""

    def read_options(self) -> dict[str, Any]:
        """Execution options for a read-only transaction."""
        return {}

    #: :meth:`join` can roll back our part alone (a savepoint).
    atomic_join = True

    @contextlib.contextmanager
    def join(self, connection: sa.Connection) -> Iterator[sa.Connection]:
        """Run our writes inside the caller's open transaction.

        A savepoint lets a lost race roll back our part alone and retry, leaving
        the caller's transaction intact.
        """
        with connection.begin_nested():
            yield connection

    def nominate(self, select: sa.Select[Any], table: sa.Table) -> sa.Select[Any]:
        """Make a claim's candidate query safe against concurrent claimers."""
        return select

    def maintenance_warnings(self, conn: sa.Connection) -> list[str]:
        """Server settings that will hurt the store, in words for an operator."""
        return []

    def set_durability(self, conn: sa.Connection, durable: bool) -> None:
        """Make this transaction's commit wait for the disk (``durable``) or not."""

    def lock_stream(self, conn: sa.Connection, key: str) -> None:
        """Make other writers of one stream wait for this transaction instead of
        losing the version race after doing the same work (hot streams: chords)."""

    def lock_log(self, conn: sa.Connection, table: sa.Table) -> None:
        """Hold off writers to the log for the rest of the transaction (rebuild)."""

    def lock_migrations(self, conn: sa.Connection, key: str) -> None:
        """Serialise concurrent migrations of the same schema."""

    def notify(self, conn: sa.Connection, channel: str, payloads: Iterable[str]) -> None:
        """Wake listeners on commit; a no-op where the database cannot."""

    def upsert(
        self, conn: sa.Connection, table: sa.Table, values: dict[str, Any], keys: tuple[str, ...]
    ) -> None:
        """Insert a row, or update it where its ``keys`` already exist."""
        raise NotImplementedError

    def listener(self, engine: sa.Engine, channels: Iterable[str]) -> Listener:
        """Something to wait on for "the store changed"; see :class:`Listener`."""
        raise NotImplementedError

    def clock_query(self) -> sa.Select[Any] | None:
        """A query for the database's clock in epoch seconds, or None to use the host's."""
        return None

    def is_conflict(self, exc: sa.exc.DBAPIError) -> bool:
        """True when the error means another transaction won a race; retry."""
        return isinstance(exc, sa.exc.IntegrityError)


class Listener:
    """Wakes consumers when messages may have become ready.

    :meth:`fileno` is a socket an event loop can watch (PostgreSQL LISTEN), or
    None when the dialect can only poll (then call :meth:`poll` on a timer).
    :meth:`poll` never blocks and returns the queues woken since the last call
    (``{"*"}`` when it cannot tell which); :meth:`wait` blocks up to ``timeout``.
    """

    def fileno(self) -> int | None:
        return None

    def poll(self) -> set[str]:
        raise NotImplementedError

    def wait(self, timeout: float) -> set[str]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the listener's connection."""


ANY_QUEUE = "*"


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
