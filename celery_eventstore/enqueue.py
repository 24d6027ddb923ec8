"""Atomic enqueue: publish inside the application's own database transaction.

::

    from celery_eventstore import atomic

    with Session(engine) as session, session.begin():
        session.add(Order(...))
        with atomic(session):
            send_confirmation.delay(order_id)

Inside the block every task published to an event-store broker on the same
database joins the caller's transaction: the job exists if and only if the
transaction commits, and workers are woken at commit.

``atomic`` takes a SQLAlchemy ``Connection`` or ``Session`` (a scoped session
too), a Django connection (``django.db.connection``, ``connections[alias]``) or a
DB-API connection (psycopg2, psycopg 3, sqlite3).  A Session or scoped session is
asked for its connection at each publish, so one ``atomic`` block can span a whole
unit of work (a web request) whose transactions come and go.  Without any
``atomic`` block, an automatic binding may apply: the Django app
``celery_eventstore.contrib.django`` registers one that joins the transaction of
Django's open ``transaction.atomic()`` block (:func:`join_automatically`).

On a SQLAlchemy ``Connection`` or ``Session`` the publishes are held in memory and
written as one batch into the caller's transaction: at the block's exit, and
before a commit or savepoint inside it (:class:`~.storage.HeldPublishes`).  A DB-API or Django
connection is written through at each publish: the store cannot see when such a
connection commits or rolls back a savepoint, so it cannot know when to write.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa

from .exceptions import EventStoreError
from .storage import (
    ABORTED,
    BROKER_PREFIX,
    NONE,
    CheckedMessage,
    EventStore,
    HeldPublishes,
    NewMessage,
    describe_connection,
    redact,
)


class AtomicEnqueueError(EventStoreError):
    """A task could not join the caller's transaction; nothing was published."""


class Binding:
    """Something a publish can join: it yields the connection to write through."""

    def joined(self, store: EventStore) -> contextlib.AbstractContextManager[sa.Connection]:
        """The caller's connection for ``store``, checked (same database, a
        transaction open), or :class:`AtomicEnqueueError`."""
        raise NotImplementedError

    def publish(self, store: EventStore, messages: Sequence[CheckedMessage]) -> None:
        """Publish ``messages`` in the caller's transaction: here, written through
        the joined connection at once."""
        with self.joined(store) as conn:
            store.publish_checked(messages, connection=conn)

    def close(self, failed: bool) -> None:
        """The ``atomic`` block ends (``failed``: by an exception)."""


#: Finds the binding a publish joins when no ``atomic`` block is open, or None.
AutomaticBinding = Callable[[EventStore], "Binding | None"]

_bound: contextvars.ContextVar[Binding | None] = contextvars.ContextVar(
    "celery_eventstore_atomic", default=None
)
_automatic: list[AutomaticBinding] = []


def _different_database(what: Any, store: EventStore) -> AtomicEnqueueError:
    return AtomicEnqueueError(
        f"atomic() was given a connection to {redact(what)}, but the broker "
        f"stores its jobs in {redact(store.url)}: a task can only join a transaction "
        "on the same database"
    )


class SQLAlchemyBinding(Binding):
    """A SQLAlchemy ``Connection``, or a ``Session`` asked for its connection at
    each publish (so a scoped session follows its current scope).  Publishes are
    held per connection and written as a batch (:class:`~.storage.HeldPublishes`)."""

    def __init__(self, target: Any) -> None:
        if not isinstance(target, sa.Connection) and not callable(
            getattr(target, "connection", None)
        ):
            raise TypeError(
                "atomic() takes a SQLAlchemy Connection or Session, a Django connection "
                f"or a DB-API connection (psycopg2, psycopg, sqlite3), not {target!r}"
            )
        self.target = target
        self._held: list[HeldPublishes] = []

    def _connection(self) -> sa.Connection:
        if isinstance(self.target, sa.Connection):
            return self.target
        conn = self.target.connection()  # a Session: its connection for its default bind
        if not isinstance(conn, sa.Connection):
            raise TypeError(f"{self.target!r}.connection() is not a SQLAlchemy Connection")
        return conn

    @contextlib.contextmanager
    def joined(self, store: EventStore) -> Iterator[sa.Connection]:
        conn = self._connection()
        self._check(conn, store)
        yield conn

    def _check(self, conn: sa.Connection, store: EventStore) -> None:
        if not store.same_database(conn.engine.url):
            raise _different_database(conn.engine.url, store)
        _check_transaction(conn)

    def publish(self, store: EventStore, messages: Sequence[CheckedMessage]) -> None:
        conn = self._connection()
        held = self._held_on(conn, store)
        _check_transaction(conn)
        held.hold(messages)

    def _held_on(self, conn: sa.Connection, store: EventStore) -> HeldPublishes:
        """What is held on ``conn`` for ``store``; the database is checked once
        per connection and store."""
        for held in reversed(self._held):
            if held.conn is conn and held.store is store:
                return held
        self._check(conn, store)
        # A session's earlier transactions' connections are done with.
        for done in [h for h in self._held if h.conn.closed]:
            done.stop_listening()
            self._held.remove(done)
        held = HeldPublishes(conn, store)
        self._held.append(held)
        return held

    def close(self, failed: bool) -> None:
        try:
            for held in self._held:
                held.close(failed)
        finally:
            for held in self._held:
                held.stop_listening()
            self._held = []


def _check_transaction(conn: sa.Connection) -> None:
    if not conn.in_transaction():
        raise AtomicEnqueueError(
            "atomic() has no open transaction to join: begin one (session.begin() or "
            "connection.begin()) around the block"
        )


class DBAPIBinding(Binding):
    """A DB-API connection the caller manages (psycopg2, psycopg 3, sqlite3): the
    store writes through it and never begins, commits, rolls back or reconfigures
    its transaction."""

    def __init__(self, get_connection: Callable[[], Any]) -> None:
        self.get_connection = get_connection

    @contextlib.contextmanager
    def joined(self, store: EventStore) -> Iterator[sa.Connection]:
        dbapi_connection = self.get_connection()
        info = describe_connection(dbapi_connection)
        if info is None:
            raise TypeError(f"atomic() does not know the driver of {dbapi_connection!r}")
        if not store.same_database(info.url):
            raise _different_database(info.url, store)
        if info.transaction == NONE:
            raise AtomicEnqueueError(
                "atomic() has no open transaction to join: the connection is in "
                "autocommit mode; begin a transaction around the block"
            )
        if info.transaction == ABORTED:
            raise AtomicEnqueueError(
                "atomic() cannot join a failed transaction: an earlier statement in it "
                "failed, so it can only be rolled back"
            )
        with store.borrow(dbapi_connection, info) as conn:
            yield conn


def binding_for(target: Any) -> Binding:
    """The :class:`Binding` for what a caller passes to :func:`atomic`."""
    if _is_django_connection(target):
        from .contrib.django import DjangoBinding

        return DjangoBinding(target)
    if not isinstance(target, sa.Connection) and describe_connection(target) is not None:
        return DBAPIBinding(lambda: target)
    return SQLAlchemyBinding(target)


def _is_django_connection(target: Any) -> bool:
    """A ``django.db`` connection wrapper, recognised without importing Django."""
    return all(hasattr(target, name) for name in ("in_atomic_block", "settings_dict", "vendor"))


@contextlib.contextmanager
def atomic(target: Any, app: Any = None) -> Iterator[Any]:
    """Make task publishes in the block join ``target``'s transaction; yields ``target``.

    ``app`` (default: Celery's current app) must use the eventstore broker:
    with any other broker the publishes could not join, so that is an error
    rather than a silent loss of atomicity.
    """
    if app is None:
        from celery import current_app

        app = current_app
    broker = str(app.conf.broker_url or "")
    if not broker.startswith(BROKER_PREFIX):
        raise AtomicEnqueueError(
            f"atomic() needs the eventstore broker, but the Celery app {app.main!r} "
            f"publishes to {broker.split('://')[0] or 'the default broker'}://"
        )
    binding = binding_for(target)
    token = _bound.set(binding)
    failed = True
    try:
        yield target
        failed = False
    finally:
        _bound.reset(token)
        binding.close(failed)


def join_automatically(find: AutomaticBinding) -> None:
    """Consult ``find`` for publishes outside any ``atomic`` block: the binding it
    returns is joined, None publishes on the store's own.  Registering the same
    function again is a no-op."""
    if find not in _automatic:
        _automatic.append(find)


def stop_joining_automatically(find: AutomaticBinding) -> None:
    """Undo :func:`join_automatically`."""
    if find in _automatic:
        _automatic.remove(find)


def same_database(url: str | sa.URL, store: EventStore) -> bool:
    """Whether ``url`` (an ``eventstore+`` broker URL or a SQLAlchemy URL object)
    names the store's database."""
    if isinstance(url, str) and not url.startswith(BROKER_PREFIX):
        return False  # another broker
    return store.same_database(url)


def _binding(store: EventStore) -> Binding | None:
    bound = _bound.get()
    if bound is not None:
        return bound
    for find in _automatic:
        found = find(store)
        if found is not None:
            return found
    return None


@contextlib.contextmanager
def joined(store: EventStore) -> Iterator[sa.Connection | None]:
    """The connection a publish to ``store`` must write through: the caller's
    while a binding applies, None (the store's own transaction) otherwise."""
    binding = _binding(store)
    if binding is None:
        yield None
        return
    with binding.joined(store) as conn:
        yield conn


def publish(store: EventStore, messages: Sequence[NewMessage]) -> None:
    """Publish ``messages`` to ``store``: in the caller's transaction while a
    binding applies (held for a batch on a SQLAlchemy one), else committed on the
    store's own.  What the store refuses is refused here, at the call."""
    checked = store.check_publish(messages)
    binding = _binding(store)
    if binding is None:
        store.publish_checked(checked)
    else:
        binding.publish(store, checked)
