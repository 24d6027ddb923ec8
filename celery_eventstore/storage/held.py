"""Publishes held in memory while an ``atomic()`` block's SQLAlchemy transaction is
open, and written as one batch before anything can commit without them.

A thousand ``delay()`` calls in one block were a thousand writes through the
caller's connection; held, they are one append (the events, their derived rows,
one wake-up per queue).  What the caller sees does not change: a task published
inside the transaction exists if and only if that transaction commits.  So the
batch is written into the transaction (and savepoint) each publish was made in:

* before the caller's commit (the ``Connection``'s ``commit`` event, which a
  ``Session``'s commit goes through too), and at the block's exit;
* before a savepoint begins, so what was published outside it is written
  outside it, and before a savepoint is released, so what was published inside
  it is written inside it;
* never after a rollback: a rolled-back savepoint drops what was held since it
  began (everything held then: the savepoint's start wrote the rest), a
  rolled-back transaction drops everything.

A batch that cannot be written stays held: the commit that follows tries again
and, failing, fails, so a transaction never commits without its publishes.

It lives in the storage package because it listens to the caller's SQLAlchemy
transaction events, which only the storage package touches; ``atomic()``
(:mod:`celery_eventstore.enqueue`) decides what to hold.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .deliveries import CheckedMessage

if TYPE_CHECKING:
    from .store import EventStore

#: Held publishes are written once this many wait: memory stays bounded, and a
#: bigger batch costs no less per message.  (Writing early is always right: what is
#: held was published in the transaction and savepoint open now.)
MAX_HELD = 1000

#: Set while a batch is written: the store's own savepoint is no boundary.
_writing: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "celery_eventstore_writing_held", default=False
)


class HeldPublishes:
    """The publishes to one store held on one ``Connection`` while its
    transaction is open; listens to that connection's transaction events."""

    def __init__(self, conn: sa.Connection, store: EventStore) -> None:
        self.conn = conn
        self.store = store
        self.messages: list[CheckedMessage] = []
        self._listeners: list[tuple[str, Callable[..., None]]] = [
            ("commit", self._on_commit),
            ("rollback", self._on_rollback),
            ("savepoint", self._on_boundary),
            ("release_savepoint", self._on_boundary),
            ("rollback_savepoint", self._on_savepoint_rollback),
        ]
        for name, listener in self._listeners:
            sa.event.listen(conn, name, listener)

    def hold(self, messages: Sequence[CheckedMessage]) -> None:
        self.messages.extend(messages)
        if len(self.messages) >= MAX_HELD:
            self.write()

    def write(self) -> None:
        """Write what is held into the connection's transaction, as it is now.
        On failure the messages stay held (and the error is raised)."""
        if not self.messages:
            return
        batch, self.messages = self.messages, []
        token = _writing.set(True)
        try:
            self.store.publish_checked(batch, connection=self.conn)
        except BaseException:
            self.messages[:0] = batch
            raise
        finally:
            _writing.reset(token)

    def close(self, failed: bool) -> None:
        """The ``atomic`` block ends: write what is held into the transaction
        still open.  After an exception (``failed``) a batch the transaction
        cannot take (a PostgreSQL transaction that failed can only roll back)
        stays held for its commit or rollback, and the block's exception is the
        one raised."""
        if not self.open:
            self.messages.clear()
            return
        try:
            self.write()
        except Exception:
            if not failed:
                raise

    @property
    def open(self) -> bool:
        """The connection has a transaction that can still commit."""
        return not self.conn.closed and self.conn.in_transaction()

    def stop_listening(self) -> None:
        """Remove the listeners, unless a batch that failed to write is held for
        the commit or rollback of a transaction still open."""
        if self.messages and self.open:
            return
        for name, listener in self._listeners:
            if sa.event.contains(self.conn, name, listener):
                sa.event.remove(self.conn, name, listener)
        self._listeners = []

    # -- the connection's transaction events ---------------------------------------

    def _on_commit(self, conn: Any) -> None:
        if _writing.get():
            return
        self.write()  # raising here stops the commit

    def _on_rollback(self, conn: Any) -> None:
        if _writing.get():
            return
        self.messages.clear()

    def _on_boundary(self, conn: Any, *args: Any) -> None:
        if not _writing.get():
            self.write()

    def _on_savepoint_rollback(self, conn: Any, *args: Any) -> None:
        if not _writing.get():
            self.messages.clear()
