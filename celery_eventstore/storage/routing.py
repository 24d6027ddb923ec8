"""Routing state: queue declarations, exchange bindings and transient messages.

This is what kombu keeps in each process's memory for other transports, put in
the database so every process sees it: a ``celery inspect`` finds the workers'
pidbox queues through the ``celery.pidbox`` bindings, a worker finds the reply
queue of the client that asked.  None of it is history.  Transient messages
(broadcasts, replies, monitoring events) are taken with a delete, expire with
their TTL, and die with their queue when it has been idle past its ``x-expires``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if TYPE_CHECKING:
    from .dialects import Dialect
    from .schema import Tables


@dataclass(frozen=True)
class QueueInfo:
    name: str
    transient: bool
    expires: float | None = None
    message_ttl: float | None = None


@dataclass(frozen=True)
class Binding:
    exchange: str
    queue: str
    routing_key: str
    pattern: str | None
    exchange_type: str


class RoutingMixin:
    """The routing operations of :class:`~celery_eventstore.storage.EventStore`."""

    tables: Tables
    dialect: Dialect
    notify_enabled: bool
    channel: str

    # Provided by EventStore.
    def _write(self, connection: sa.Connection | None = None, *, durable: bool = True) -> Any: ...
    def _read(self) -> Any: ...
    def now(self) -> float: ...  # type: ignore[empty-body]

    def declare_queue(self, info: QueueInfo, *, connection: sa.Connection | None = None) -> None:
        """Record a queue's declaration (idempotent; a re-declaration refreshes it).

        An unchanged durable queue is not written again.  ``connection`` joins the
        caller's transaction (the producer inside ``atomic``): on SQLite a write
        on another connection would wait for the lock that transaction holds.
        """
        if not info.transient and self.queue_info([info.name]).get(info.name) == info:
            return
        with self._write(connection) as conn:
            self.dialect.upsert(
                conn,
                self.tables.queues,
                {
                    "name": info.name,
                    "transient": info.transient,
                    "expires": info.expires,
                    "message_ttl": info.message_ttl,
                    "last_active": self.now(),
                },
                keys=("name",),
            )

    def queue_info(self, names: Iterable[str]) -> dict[str, QueueInfo]:
        """Declarations of the named queues that exist."""
        wanted = sorted(set(names))
        if not wanted:
            return {}
        q = self.tables.queues
        with self._read() as conn:
            rows = conn.execute(
                sa.select(q.c.name, q.c.transient, q.c.expires, q.c.message_ttl).where(
                    q.c.name.in_(wanted)
                )
            )
            return {
                r.name: QueueInfo(r.name, bool(r.transient), r.expires, r.message_ttl)
                for r in rows
            }

    def queue_exists(self, name: str) -> bool:
        """Declared, or holding messages."""
        q, msgs = self.tables.queues, self.tables.messages
        with self._read() as conn:
            declared = conn.execute(sa.select(q.c.name).where(q.c.name == name)).first()
            if declared:
                return True
            return conn.execute(
                sa.select(msgs.c.delivery_id).where(msgs.c.queue == name).limit(1)
            ).first() is not None

    def touch_queues(self, names: Sequence[str]) -> None:
        """Mark queues as in use, so their ``x-expires`` does not run out."""
        if not names:
            return
        q = self.tables.queues
        with self._write(durable=False) as conn:
            conn.execute(q.update().where(q.c.name.in_(list(names))).values(last_active=self.now()))

    def bind(self, binding: Binding, *, connection: sa.Connection | None = None) -> None:
        """Record a binding (idempotent; an existing one is not written again)."""
        if binding in self.bindings(binding.exchange):
            return
        with self._write(connection) as conn:
            self.dialect.upsert(
                conn,
                self.tables.bindings,
                {
                    "exchange": binding.exchange,
                    "queue": binding.queue,
                    "routing_key": binding.routing_key,
                    "pattern": binding.pattern,
                    "exchange_type": binding.exchange_type,
                },
                keys=("exchange", "queue", "routing_key"),
            )

    def unbind(self, exchange: str, queue: str, routing_key: str) -> None:
        b = self.tables.bindings
        with self._write() as conn:
            conn.execute(
                b.delete().where(
                    b.c.exchange == exchange, b.c.queue == queue, b.c.routing_key == routing_key
                )
            )

    def bindings(self, exchange: str) -> list[Binding]:
        """Every binding of ``exchange``, made by any process."""
        b = self.tables.bindings
        with self._read() as conn:
            rows = conn.execute(
                sa.select(b).where(b.c.exchange == exchange).order_by(b.c.queue, b.c.routing_key)
            )
            return [
                Binding(r.exchange, r.queue, r.routing_key, r.pattern, r.exchange_type)
                for r in rows
            ]

    def put_transient(
        self, messages: Sequence[tuple[str, Mapping[str, Any], int, float | None]]
    ) -> None:
        """Store ``(queue, payload, priority, expires_at)`` messages outside the log."""
        if not messages:
            return
        with self._write(durable=False) as conn:
            conn.execute(
                self.tables.transient_messages.insert(),
                [
                    {"queue": q, "payload": dict(p), "priority": pri, "expires_at": exp}
                    for q, p, pri, exp in messages
                ],
            )
            if self.notify_enabled:
                self.dialect.notify(conn, self.channel, (q for q, _, _, _ in messages))

    def take_transient(self, queues: Sequence[str], limit: int) -> list[tuple[str, dict[str, Any]]]:
        """Remove and return up to ``limit`` live transient messages, highest priority first."""
        if not queues or limit <= 0:
            return []
        t = self.tables.transient_messages
        with self._write(durable=False) as conn:
            now = self.now()
            rows = conn.execute(
                self.dialect.nominate(
                    sa.select(t.c.id, t.c.queue, t.c.payload, t.c.expires_at)
                    .where(t.c.queue.in_(list(queues)))
                    .order_by(t.c.priority.desc(), t.c.id)
                    .limit(limit),
                    t,
                )
            ).all()
            if rows:
                conn.execute(t.delete().where(t.c.id.in_([r.id for r in rows])))
        return [
            (r.queue, r.payload) for r in rows if r.expires_at is None or r.expires_at > now
        ]

    def transient_size(self, queue: str) -> int:
        t = self.tables.transient_messages
        with self._read() as conn:
            return int(
                conn.execute(sa.select(sa.func.count()).where(t.c.queue == queue)).scalar_one()
            )

    def purge_transient(self, queue: str) -> int:
        t = self.tables.transient_messages
        with self._write() as conn:
            return int(conn.execute(t.delete().where(t.c.queue == queue)).rowcount or 0)

    def forget_queue(self, queue: str) -> None:
        """Drop a queue's declaration, bindings and transient messages."""
        with self._write() as conn:
            for table, column in (
                (self.tables.transient_messages, self.tables.transient_messages.c.queue),
                (self.tables.bindings, self.tables.bindings.c.queue),
                (self.tables.queues, self.tables.queues.c.name),
            ):
                conn.execute(table.delete().where(column == queue))

    def sweep(self) -> int:
        """Delete expired transient messages and queues idle past their ``x-expires``.

        Returns how many queues were removed.  Any process may run it, any time.
        """
        q, t, b = self.tables.queues, self.tables.transient_messages, self.tables.bindings
        with self._write(durable=False) as conn:
            now = self.now()
            conn.execute(t.delete().where(t.c.expires_at.is_not(None), t.c.expires_at <= now))
            idle = list(
                conn.execute(
                    sa.select(q.c.name).where(
                        q.c.expires.is_not(None), q.c.last_active + q.c.expires <= now
                    )
                ).scalars()
            )
            if idle:
                conn.execute(t.delete().where(t.c.queue.in_(idle)))
                conn.execute(b.delete().where(b.c.queue.in_(idle)))
                conn.execute(q.delete().where(q.c.name.in_(idle)))
            return len(idle)
