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
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa

from .exceptions import EventStoreError
from .storage import BROKER_PREFIX, EventStore, redact


class AtomicEnqueueError(EventStoreError):
    """A task could not join the caller's transaction; nothing was published."""


_bound: contextvars.ContextVar[sa.Connection | None] = contextvars.ContextVar(
    "celery_eventstore_atomic", default=None
)


def _connection_of(target: Any) -> sa.Connection:
    if isinstance(target, sa.Connection):
        return target
    connection = getattr(target, "connection", None)
    if callable(connection):  # a Session: its connection for the store's engine
        conn = connection()
        if isinstance(conn, sa.Connection):
            return conn
    raise TypeError(f"atomic() takes a SQLAlchemy Connection or Session, not {target!r}")


@contextlib.contextmanager
def atomic(target: Any, app: Any = None) -> Iterator[sa.Connection]:
    """Make task publishes in the block join ``target``'s transaction.

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
    conn = _connection_of(target)
    token = _bound.set(conn)
    try:
        yield conn
    finally:
        _bound.reset(token)


def same_database(url: str | sa.URL, store: EventStore) -> bool:
    """Whether ``url`` (an ``eventstore+`` broker URL or a SQLAlchemy URL object)
    names the store's database."""
    if isinstance(url, str) and not url.startswith(BROKER_PREFIX):
        return False  # another broker
    return store.same_database(url)


def current_connection(store: EventStore) -> sa.Connection | None:
    """The connection a publish to ``store`` must join, or None outside ``atomic``."""
    conn = _bound.get()
    if conn is None:
        return None
    if not store.same_database(conn.engine.url):
        raise AtomicEnqueueError(
            f"atomic() was given a connection to {redact(conn.engine.url)}, but the broker "
            f"stores its jobs in {redact(store.url)}: a task can only join a transaction "
            "on the same database"
        )
    if not conn.in_transaction():
        raise AtomicEnqueueError(
            "atomic() has no open transaction to join: begin one (session.begin() or "
            "connection.begin()) around the block"
        )
    return conn
