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
    from .database import Database
    from .notifiers import Notifier
    from .queries import Queries


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


class Routing:
    """Queue declarations, exchange bindings and transient messages."""

    def __init__(
        self, db: Database, queries: Queries, notifier: Notifier, ready_channel: str
    ) -> None:
        self.db = db
        self.queries = queries
        self.notifier = notifier
        self.ready_channel = ready_channel

    def declare_queue(self, info: QueueInfo, *, connection: sa.Connection | None = None) -> None:
        """Record a queue's declaration (idempotent; a re-declaration refreshes it).

        An unchanged durable queue is not written again.  ``connection`` joins the
        caller's transaction (the producer inside ``atomic``): on SQLite a write
        on another connection would wait for the lock that transaction holds.
        """
        if not info.transient and self.queue_info([info.name]).get(info.name) == info:
            return
        with self.db.write(connection) as tx:
            tx.conn.execute(self.queries.upsert_queue, {
                "name": info.name,
                "transient": info.transient,
                "expires": info.expires,
                "message_ttl": info.message_ttl,
                "last_active": tx.now,
            })

    def queue_info(self, names: Iterable[str]) -> dict[str, QueueInfo]:
        """Declarations of the named queues that exist."""
        wanted = sorted(set(names))
        if not wanted:
            return {}
        with self.db.read() as conn:
            rows = conn.execute(self.queries.queue_info, {"names": wanted})
            return {
                r.name: QueueInfo(r.name, bool(r.transient), r.expires, r.message_ttl)
                for r in rows
            }

    def queue_exists(self, name: str) -> bool:
        """Declared, or holding messages."""
        with self.db.read() as conn:
            return any(
                conn.execute(query, {"name": name}).first() is not None
                for query in (self.queries.queue_declared, self.queries.queue_has_messages)
            )

    def touch_queues(self, names: Sequence[str]) -> None:
        """Mark queues as in use, so their ``x-expires`` does not run out."""
        if not names:
            return
        with self.db.write(durable=False) as tx:
            tx.conn.execute(self.queries.touch_queues, {"names": list(names), "now": tx.now})

    def bind(self, binding: Binding, *, connection: sa.Connection | None = None) -> None:
        """Record a binding (idempotent; an existing one is not written again)."""
        if binding in self.bindings(binding.exchange):
            return
        with self.db.write(connection) as tx:
            tx.conn.execute(self.queries.upsert_binding, {
                "exchange": binding.exchange,
                "queue": binding.queue,
                "routing_key": binding.routing_key,
                "pattern": binding.pattern,
                "exchange_type": binding.exchange_type,
            })

    def unbind(self, exchange: str, queue: str, routing_key: str) -> None:
        with self.db.write() as tx:
            tx.conn.execute(self.queries.unbind, {
                "exchange": exchange, "queue": queue, "routing_key": routing_key,
            })

    def bindings(self, exchange: str) -> list[Binding]:
        """Every binding of ``exchange``, made by any process."""
        with self.db.read() as conn:
            rows = conn.execute(self.queries.bindings, {"exchange": exchange})
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
        rows = [
            {"queue": q, "payload": dict(p), "priority": pri, "expires_at": exp}
            for q, p, pri, exp in messages
        ]
        params: Any = rows
        if self.queries.transient_as_lists:
            params = {f"t_{key}": [row[key] for row in rows] for key in rows[0]}

        def attempt() -> None:
            with self.db.write(durable=False) as tx:
                tx.conn.execute(self.queries.insert_transient, params)
                self.notifier.send(tx.conn, self.ready_channel, (q for q, _, _, _ in messages))

        # A broadcast holds its queues' rows and a sweep deletes them, each in
        # its own order: the rare deadlock between them is a race to run again.
        self.db.retrying(attempt)

    def take_transient(self, queues: Sequence[str], limit: int) -> list[tuple[str, dict[str, Any]]]:
        """Remove and return up to ``limit`` live transient messages, highest priority first."""
        if not queues or limit <= 0:
            return []
        with self.db.write(durable=False) as tx:
            rows = tx.conn.execute(
                self.queries.nominate_transient, {"queues": list(queues), "limit": limit}
            ).all()
            if not rows:
                return []
            tx.conn.execute(self.queries.delete_transient, {"ids": [r.id for r in rows]})
            now = tx.now  # read in the transaction (the clock may not be read yet)
        return [(r.queue, r.payload) for r in rows if r.expires_at is None or r.expires_at > now]

    def transient_size(self, queue: str) -> int:
        with self.db.read() as conn:
            return int(conn.execute(self.queries.count_transient, {"queue": queue}).scalar_one())

    def purge_transient(self, queue: str) -> int:
        with self.db.write() as tx:
            return int(
                tx.conn.execute(self.queries.purge_transient, {"queue": queue}).rowcount or 0
            )

    def forget_queue(self, queue: str) -> None:
        """Drop a queue's declaration, bindings and transient messages."""
        with self.db.write() as tx:
            for statement in self.queries.forget_queue:
                tx.conn.execute(statement, {"queue": queue})

    def sweep(self) -> int:
        """Delete expired transient messages and queues idle past their ``x-expires``.

        Returns how many queues were removed.  Any process may run it, any time.
        """

        def attempt() -> int:
            with self.db.write(durable=False) as tx:
                tx.conn.execute(self.queries.delete_expired_transient, {"now": tx.now})
                idle = list(tx.conn.execute(self.queries.idle_queues, {"now": tx.now}).scalars())
                if idle:
                    for statement in self.queries.delete_idle_queues:
                        tx.conn.execute(statement, {"names": idle})
                return len(idle)

        return self.db.retrying(attempt)
