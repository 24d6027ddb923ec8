"""kombu transport on the celery_eventstore event store.

Connection String
=================

``eventstore+`` followed by any SQLAlchemy URL::

    eventstore+sqlite:///jobs.db
    eventstore+postgresql://app@db/app            (psycopg2, the default driver)
    eventstore+postgresql+psycopg://app@db/app    (psycopg 3)

Features
========

* Type: virtual, with the store as the broker: every publish, claim, ack, reject
  and restore of a task message is an event in the task's stream.
* Supports direct, topic and fanout exchanges; bindings live in the database, so
  ``celery inspect``, ``celery control`` and broadcast revoke work across hosts.
  A broadcast revoke is also recorded in the store: durable, like
  ``celery-eventstore revoke``.
* Server-side ETA/countdown: a message is not delivered before it is due.
* Leases instead of a visibility timeout that fires on live tasks: the worker
  renews the leases of the messages it holds; a crashed worker's messages come
  back when their lease runs out, marked redelivered.
* Priorities 0-9, served in the Redis transport's order by default (0 first).
* Wake-ups through LISTEN/NOTIFY on PostgreSQL (registered with the worker's
  event loop), and cheap change detection on SQLite; a periodic poll is the
  safety net.
* Broadcast, reply and monitoring traffic (queues that are auto-delete,
  exclusive or have a TTL) is transient: kept out of the history, dropped with
  its TTL.

Transport Options
=================

* ``visibility_timeout``: lease length in seconds (default 60).  Held messages
  are renewed well before it runs out, so it bounds crash recovery, not task length.
* ``max_claims``: a message whose lease ran out this many times is dead-lettered
  (default 5).
* ``priority_order``: ``"redis"`` (0 is served first, the default) or ``"amqp"``
  (9 is served first).
* ``polling_interval``: seconds between safety-net polls (default 1.0).
* ``ack_flush_interval``: longest time an ack waits to be written with others
  (default 0.1 s).  A crash inside that window redelivers the message after its
  lease, as a crash just before the ack would.
* ``claim_batch``: most messages claimed in one round trip when prefetch is
  unlimited (default 100).
* ``table_prefix``, ``schema``, ``auto_migrate`` (default True), ``notify``
  (default True; turn off behind PgBouncer transaction pooling),
  ``max_message_size``, ``async_commit`` (default True: claims, acks and lease
  renewals do not wait for the disk; publishes and results always do): passed
  to the store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from queue import Empty
from typing import Any

from kombu import serialization
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments

from .exceptions import DatabaseUnavailable
from .storage import (
    ANY_QUEUE,
    BROKER_PREFIX,
    Binding,
    ClaimRef,
    EventStore,
    Listener,
    NewMessage,
    Outcome,
    QueueInfo,
    parse_url,
    redact,
)
from .stores import shared_store

logger = logging.getLogger(__name__)

DEFAULT_LEASE = 60.0
DEFAULT_MAX_CLAIMS = 5
DEFAULT_CLAIM_BATCH = 100
DEFAULT_ACK_FLUSH_INTERVAL = 0.1
#: How long a process trusts what it read of other processes' routing state.
ROUTING_CACHE_SECONDS = 1.0
#: How often a consuming process sweeps expired transient queues and messages.
SWEEP_INTERVAL = 10.0

#: Serialisations of control broadcasts the transport reads (to make revokes
#: durable); nothing that can run code when loaded.
CONTROL_CONTENT_TYPES = ("application/json", "application/x-msgpack", "application/x-yaml")

STORE_OPTIONS = (
    "table_prefix", "schema", "auto_migrate", "notify", "max_message_size", "async_commit",
    "engine_options",
)


def _connection_errors() -> tuple[type[BaseException], ...]:
    # The store translates every driver error that means "the database cannot
    # serve us now" into DatabaseUnavailable: that, and the socket errors of the
    # LISTEN connection, are what Celery reconnects on.
    return (DatabaseUnavailable, ConnectionError)


def to_epoch(value: Any) -> float | None:
    """Celery's ``eta``/``expires`` headers (ISO-8601 strings) as epoch seconds.

    kombu's pidbox sends ``expires`` as epoch seconds, and 0 when a broadcast waits
    for no reply: that 0 means never, as it does to kombu.
    """
    if value is None or value == "" or value == 0:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime):
        when: datetime = value
        if when.tzinfo is None:  # Celery sends aware times; naive ones are UTC.
            when = when.replace(tzinfo=timezone.utc)
        return when.timestamp()
    raise ValueError(f"not a time: {value!r}")


class QoS(virtual.QoS):
    """Prefetch accounting; unacked claims are released in one batch at shutdown."""

    channel: Channel

    def restore_unacked(self) -> list[tuple[BaseException, Any]]:
        self.channel.flush_acks()
        self._flush()
        refs = []
        messages = []
        while self._delivered:
            tag, message = self._delivered.popitem()
            ref = self.channel.forget_claim(tag)
            if ref is not None:
                refs.append(ref)
                messages.append(message)
        self._delivered.clear()
        if not refs:
            return []
        try:
            self.channel.store.restore(refs)
        except Exception as exc:  # reported by kombu; the leases bring them back anyway
            return [(exc, m) for m in messages]
        return []


class Channel(virtual.Channel):
    QoS = QoS
    supports_fanout = True
    do_restore = True

    from_transport_options = virtual.Channel.from_transport_options + (  # type: ignore[assignment]
        "visibility_timeout",
        "max_claims",
        "priority_order",
        "claim_batch",
        "ack_flush_interval",
    )
    visibility_timeout = DEFAULT_LEASE
    max_claims: int | None = DEFAULT_MAX_CLAIMS
    priority_order = "redis"
    claim_batch = DEFAULT_CLAIM_BATCH
    ack_flush_interval = DEFAULT_ACK_FLUSH_INTERVAL

    connection: Transport

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        if self.priority_order not in ("redis", "amqp"):
            raise ValueError(
                f"priority_order must be 'redis' or 'amqp', not {self.priority_order!r}"
            )
        self.store: EventStore = connection.store
        # delivery tag -> (claim, lease end); touched by the consuming thread and
        # read by the lease keeper, hence the lock.
        self._claims: dict[str, tuple[ClaimRef, float]] = {}
        self._claims_lock = threading.Lock()
        self._pending_acks: list[ClaimRef] = []
        self._acks_since: float | None = None  # when the oldest pending ack came
        self._acks_lock = threading.Lock()
        self._noack_queues: set[str] = set()
        self._declared: dict[str, QueueInfo] = {}
        self._routing_cache: dict[str, tuple[float, Any]] = {}
        self._last_touch = 0.0
        #: True when the last claim filled the credit: there may be more waiting.
        self.maybe_more = False
        #: Messages a background claim in flight may still bring (its limit).
        self.claiming = 0
        #: A wake-up came while a background claim was in flight.
        self.claim_again = False

    # -- queues and routing ----------------------------------------------------

    def prepare_queue_arguments(self, arguments: Mapping[str, Any], **kwargs: Any) -> Any:
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        arguments = kwargs.get("arguments") or {}
        expires = arguments.get("x-expires")
        ttl = arguments.get("x-message-ttl")
        info = QueueInfo(
            name=queue,
            transient=bool(
                kwargs.get("auto_delete") or kwargs.get("exclusive") or expires or ttl
            ),
            expires=expires / 1000.0 if expires else None,
            message_ttl=ttl / 1000.0 if ttl else None,
        )
        if self._declared.get(queue) != info:
            self.store.declare_queue(info, connection=self.connection.atomic_connection())
            self._declared[queue] = info

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return queue in self._declared or self.store.queue_exists(queue)

    def _queue_info(self, queue: str) -> QueueInfo:
        if queue in self._declared:
            return self._declared[queue]
        info = self._cached(f"queue:{queue}", lambda: self.store.queue_info([queue]).get(queue))
        return info or QueueInfo(queue, transient=False)

    def _still_declared(self, queue: str) -> bool:
        """Whether a queue reached through an exchange still exists.  Only a queue
        not known to exist costs a fresh read: one declared a moment ago elsewhere
        must not be mistaken for one the sweep removed."""
        if queue in self._declared:
            return True
        hit = self._routing_cache.get(f"queue:{queue}")
        now = time.monotonic()
        if hit is not None and hit[1] is not None and now - hit[0] < ROUTING_CACHE_SECONDS:
            return True
        info = self.store.queue_info([queue]).get(queue)
        self._routing_cache[f"queue:{queue}"] = (now, info)
        return info is not None

    def _cached(self, key: str, load: Any) -> Any:
        now = time.monotonic()
        hit = self._routing_cache.get(key)
        if hit is not None and now - hit[0] < ROUTING_CACHE_SECONDS:
            return hit[1]
        value = load()
        self._routing_cache[key] = (now, value)
        return value

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str | None, queue: str) -> None:
        exchange_type = self.state.exchanges.get(exchange, {}).get("type", "direct")
        self.store.bind(
            Binding(exchange, queue, routing_key or "", pattern, exchange_type),
            connection=self.connection.atomic_connection(),
        )
        self._routing_cache.pop(f"table:{exchange}", None)

    def _bindings(self, exchange: str) -> list[Binding]:
        return list(self._cached(f"table:{exchange}", lambda: self.store.bindings(exchange)))

    def _lookup(self, exchange: str, routing_key: str, default: Any = None) -> list[str]:
        queues: list[str] = super()._lookup(exchange, routing_key, default)
        if not queues and exchange and bool(self._routing_cache.pop(f"table:{exchange}", None)):
            # Routed nowhere by a cached table: the binding may be newer than the
            # cache (a reply queue declared a moment ago), so read it again.
            queues = super()._lookup(exchange, routing_key, default)
        return queues

    def get_table(self, exchange: str) -> list[tuple[str, str | None, str]]:
        return [(b.routing_key, b.pattern, b.queue) for b in self._bindings(exchange)]

    def typeof(self, exchange: str, default: str = "direct") -> Any:
        if exchange in self.state.exchanges:
            return super().typeof(exchange, default)
        bindings = self._bindings(exchange)
        return self.exchange_types[bindings[0].exchange_type if bindings else default]

    def queue_unbind(
        self, queue: str, exchange: str | None = None, routing_key: str = "",
        arguments: Any = None, **kwargs: Any,
    ) -> None:
        self.store.unbind(exchange or "amq.direct", queue, routing_key or "")
        self._routing_cache.pop(f"table:{exchange}", None)
        super().queue_unbind(queue, exchange, routing_key, arguments, **kwargs)

    def queue_delete(
        self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any
    ) -> None:
        if if_empty and self._size(queue):
            return
        if not self._queue_info(queue).transient:
            self.store.purge(queue, reason="queue deleted")
        self.store.forget_queue(queue)
        self._declared.pop(queue, None)
        self.state.queue_bindings_delete(queue)

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self.queue_delete(queue)

    def _purge(self, queue: str) -> int:
        if self._queue_info(queue).transient:
            return self.store.purge_transient(queue)
        return self.store.purge(queue)

    def _size(self, queue: str) -> int:
        if self._queue_info(queue).transient:
            return self.store.transient_size(queue)
        return self.store.queue_size(queue)

    # -- publishing ------------------------------------------------------------

    def _store_priority(self, message: Mapping[str, Any]) -> int:
        priority: int = self._get_message_priority(message, reverse=False)
        # The store serves its highest number first.
        return priority if self.priority_order == "amqp" else self.max_priority - priority

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        self._put_many([queue], message)

    def _put_fanout(self, exchange: str, message: dict[str, Any], routing_key: str,
                    **kwargs: Any) -> None:
        # Celery's broadcast revoke lives in worker memory only; record it in the
        # store too, so a pending or scheduled task is never delivered again.
        for task_id in self._control_revokes(exchange, message):
            self.store.revoke(task_id, reason="revoked by a control broadcast")
        self._put_many(sorted({b.queue for b in self._bindings(exchange)}), message)

    def _control_revokes(self, exchange: str, message: Mapping[str, Any]) -> list[str]:
        """Task ids of a ``revoke`` broadcast to a Celery mailbox (``*.pidbox``)."""
        if not exchange.endswith(".pidbox"):
            return []
        try:
            body = message["body"]
            encoding = (message.get("properties") or {}).get("body_encoding")
            if encoding:
                body = self.codecs[encoding].decode(body)
            request = serialization.loads(
                body, message.get("content-type"), message.get("content-encoding"),
                accept=CONTROL_CONTENT_TYPES,
            )
        except Exception:  # not ours to judge: the broadcast still goes out
            return []
        if not isinstance(request, dict) or request.get("method") != "revoke":
            return []
        ids = (request.get("arguments") or {}).get("task_id")
        return [ids] if isinstance(ids, str) else [str(i) for i in ids or ()]

    def _put_many(self, queues: Sequence[str], message: dict[str, Any]) -> None:
        now = self.store.now()
        headers = message.get("headers") or {}
        props = message.get("properties") or {}
        expires = to_epoch(headers.get("expires"))
        if props.get("expiration") not in (None, ""):
            ttl_expiry = now + float(props["expiration"]) / 1000.0
            expires = ttl_expiry if expires is None else min(expires, ttl_expiry)
        priority = self._store_priority(message)
        routed = bool((props.get("delivery_info") or {}).get("exchange"))
        durable, transient = [], []
        for queue in queues:
            if routed and not self._still_declared(queue):
                continue  # a cached binding outlived its swept queue: drop, as AMQP does
            info = self._queue_info(queue)
            if info.transient:
                queue_expiry = now + info.message_ttl if info.message_ttl else None
                expiry = min((e for e in (expires, queue_expiry) if e is not None), default=None)
                transient.append((queue, message, priority, expiry))
            else:
                # A message without a Celery task id is a stream of its own.
                delivery = uuid.uuid4().hex
                durable.append(
                    NewMessage(
                        stream=str(headers.get("id") or delivery),
                        delivery=delivery,
                        queue=queue,
                        message=message,
                        priority=priority,
                        not_before=to_epoch(headers.get("eta")),
                        expires=expires,
                        metadata=_publish_metadata(message),
                        # A retry goes to its task's existing stream.
                        new_stream=not headers.get("retries"),
                    )
                )
        if durable:
            self.store.publish(durable, connection=self.connection.atomic_connection())
        if transient:
            self.store.put_transient(transient)

    # -- consuming -------------------------------------------------------------

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._noack_queues.add(queue)
        result = super().basic_consume(queue, no_ack, *args, **kwargs)
        self.connection.on_consume()
        return result

    def basic_cancel(self, consumer_tag: str) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        if queue is not None:
            self._noack_queues.discard(queue)
        return super().basic_cancel(consumer_tag)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        message = super().basic_get(queue, no_ack=no_ack, **kwargs)
        if message is not None and no_ack:
            ref = self.forget_claim(message.delivery_tag)
            if ref is not None:
                self.store.ack([ref])
        return message

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        for payload, _ in self.claim([queue], 1):
            return payload
        raise Empty()

    def _get_many(self, queues: Sequence[str], timeout: float | None = None) -> None:
        if not self.deliver_ready(queues):
            raise Empty()

    def credit(self) -> int:
        estimate = self.qos.can_consume_max_estimate()
        credit = self.claim_batch if estimate is None else min(estimate, self.claim_batch)
        # A claim in flight (the event loop's background claimer) may fill it.
        return credit - self.claiming

    def refill_at(self) -> int:
        """With a backlog waiting, claim again once half the prefetch window is
        free: fewer, larger transactions than one claim per finished task."""
        return max(1, (self.qos.prefetch_count or 0) // 2)

    def deliver_ready(self, queues: Sequence[str] | None = None) -> int:
        """Claim what the prefetch credit allows and hand it to the consumers."""
        if queues is None:
            queues = self._active_queues
        if not queues or not self._consumers:
            return 0
        limit = self.credit()
        if limit <= 0:
            self.maybe_more = True
            return 0
        fetcher = self.connection._fetcher
        if fetcher is not None:
            # Under the worker's event loop: claim in the background, deliver
            # when the claimer reports back (Transport._on_claimed).
            if fetcher.request(self, list(queues), limit):
                self.claiming += limit
            else:
                # A claim is already under way and may have nominated before
                # this wake-up's message committed: claim again after it.
                self.claim_again = True
            return 0
        return self.deliver_claimed(self.claim(queues, limit), limit)

    def deliver_claimed(self, batch: list[tuple[dict[str, Any], str]], limit: int) -> int:
        self.maybe_more = len(batch) >= limit
        for payload, queue in batch:
            self.connection._deliver(payload, queue)
        return len(batch)

    def claim(self, queues: Sequence[str], limit: int) -> list[tuple[dict[str, Any], str]]:
        """Write the pending acks and claim up to ``limit`` messages from ``queues``,
        in one transaction (transient queues take one more)."""
        durable = [q for q in queues if not self._queue_info(q).transient]
        transient = [q for q in queues if q not in durable]
        out: list[tuple[dict[str, Any], str]] = []
        if not durable:
            self.flush_acks()
        else:
            acks = self._take_acks()
            try:
                outcomes, claimed = self.store.ack_and_claim(
                    acks, durable, limit, self.connection.consumer_id, self.visibility_timeout,
                    max_claims=self.max_claims,
                )
            except Exception:
                self._return_acks(acks)
                raise
            _warn_stale(outcomes, "ack")
            noack: list[ClaimRef] = []
            for m in claimed:
                payload = _for_delivery(m.message, m.claim, m.redelivered)
                if m.queue in self._noack_queues:
                    noack.append(m.ref)
                else:
                    with self._claims_lock:
                        self._claims[m.claim] = (m.ref, m.lease_until)
                out.append((payload, m.queue))
            if noack:
                self.store.ack(noack)
        if transient and len(out) < limit:
            self._touch(transient)
            for queue, payload in self.store.take_transient(transient, limit - len(out)):
                out.append((_for_delivery(payload, uuid.uuid4().hex, False), queue))
        return out

    def _touch(self, queues: Sequence[str]) -> None:
        expiries = [self._queue_info(q).expires for q in queues]
        shortest = min((e for e in expiries if e), default=None)
        now = time.monotonic()
        if shortest is not None and now - self._last_touch > shortest / 3:
            self._last_touch = now
            self.store.touch_queues(list(queues))

    def forget_claim(self, tag: str) -> ClaimRef | None:
        with self._claims_lock:
            entry = self._claims.pop(tag, None)
        return entry[0] if entry else None

    # -- outcomes --------------------------------------------------------------

    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        ref = self.forget_claim(delivery_tag)
        if ref is not None:
            with self._acks_lock:
                self._pending_acks.append(ref)
                if self._acks_since is None:
                    self._acks_since = time.monotonic()
                full = len(self._pending_acks) >= self.claim_batch
            if full:
                self.flush_acks()
        super().basic_ack(delivery_tag, multiple)

    def _take_acks(self) -> list[ClaimRef]:
        with self._acks_lock:
            refs, self._pending_acks = self._pending_acks, []
            self._acks_since = None
        return refs

    def _return_acks(self, refs: list[ClaimRef]) -> None:
        with self._acks_lock:
            self._pending_acks[:0] = refs
            self._acks_since = self._acks_since or time.monotonic()

    def flush_acks(self, *, older_than: float = 0.0) -> None:
        """Write the acks collected so far in one transaction (only once the oldest
        has waited ``older_than`` seconds)."""
        since = self._acks_since
        if since is None or time.monotonic() - since < older_than:
            return
        refs = self._take_acks()
        if not refs:
            return
        try:
            outcomes = self.store.ack(refs)
        except Exception:
            self._return_acks(refs)
            raise
        _warn_stale(outcomes, "ack")

    def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
        ref = self.forget_claim(delivery_tag)
        if ref is not None:
            self.flush_acks()
            reason = "rejected and requeued" if requeue else "rejected by the consumer"
            _warn_stale(self.store.reject([ref], requeue=requeue, reason=reason), "reject")
        super().basic_reject(delivery_tag, requeue=False)

    def _restore(self, message: Any) -> None:
        ref = self.forget_claim(message.delivery_tag)
        if ref is not None:
            self.store.restore([ref])

    _restore_at_beginning = _restore

    def renew_leases(self) -> None:
        """Extend the leases of held messages that are past half their lease."""
        now = self.store.now()
        with self._claims_lock:
            due = [
                (tag, ref) for tag, (ref, until) in self._claims.items()
                if until - now < self.visibility_timeout / 2
            ]
        if not due:
            return
        outcomes = self.store.renew([ref for _, ref in due], self.visibility_timeout)
        with self._claims_lock:
            for tag, ref in due:
                if outcomes.get(ref.delivery) is Outcome.DONE and tag in self._claims:
                    self._claims[tag] = (ref, now + self.visibility_timeout)
        _warn_stale(outcomes, "lease renewal")

    def close(self) -> None:
        try:
            self.flush_acks()
        except Exception:
            logger.exception("could not write pending acks; their leases will bring them back")
        super().close()


class Transport(virtual.Transport):
    Channel = Channel

    can_parse_url = True
    default_port = None
    polling_interval = 1.0
    driver_type = "eventstore"
    driver_name = "sqlalchemy"
    #: How often the event loop checks a listener that has no socket (SQLite).
    listener_poll_interval = 0.01

    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False,
    )
    connection_errors = virtual.Transport.connection_errors + _connection_errors()
    channel_errors = virtual.Transport.channel_errors

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        options = client.transport_options or {}
        self.store = shared_store(
            client.hostname, {k: options[k] for k in STORE_OPTIONS if k in options}
        )
        self.consumer_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._listener: Listener | None = None
        self._keeper: _Keeper | None = None
        self._fetcher: _Claimer | None = None
        self._hub: Any = None
        self._atomic: Any = None

    def as_uri(self, uri: str, include_password: bool = False, mask: str = "**") -> str:
        url = parse_url(uri)
        text = url.render_as_string(hide_password=False) if include_password else redact(url)
        return f"{BROKER_PREFIX}{text}"

    # -- connection ------------------------------------------------------------

    def establish_connection(self) -> Any:
        self.store.ping()
        return super().establish_connection()

    def close_connection(self, connection: Any) -> None:
        if self._keeper is not None:
            self._keeper.stop()
            self._keeper = None
        if self._hub is not None:
            self._hub.on_tick.discard(self._on_tick)
        if self._fetcher is not None:
            if self._hub is not None:
                self._hub.remove_reader(self._fetcher.fileno())
            self._fetcher.stop()  # gives back what it claimed and did not deliver
            self._fetcher = None
        super().close_connection(connection)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def atomic_connection(self) -> Any:
        """The caller's SQLAlchemy connection while inside ``celery_eventstore.atomic``."""
        from .enqueue import current_connection

        return current_connection(self.store)

    @property
    def listener(self) -> Listener:
        if self._listener is None:
            self._listener = self.store.listener()
        return self._listener

    def on_consume(self) -> None:
        """The first consumer starts the lease keeper (renewals, ack flushes, sweeps)."""
        if self._keeper is None:
            self._keeper = _Keeper(self)
            self._keeper.start()

    def _deliver_all(self, woken: Iterable[str] = (ANY_QUEUE,)) -> None:
        woken = set(woken)
        for channel in list(self.channels):
            if not channel._consumers:
                continue
            if ANY_QUEUE in woken or woken & set(channel._active_queues) or channel.maybe_more:
                channel.deliver_ready()

    # -- blocking path (celery inspect, synloop, eventlet/gevent) ---------------

    def drain_events(
        self, connection: Any, timeout: float | None = None, **kwargs: Any
    ) -> None:
        start = time.monotonic()
        while True:
            try:
                self.cycle.get(self._deliver, timeout=timeout)  # type: ignore[union-attr]
                return
            except Empty:
                pass
            wait = self.polling_interval
            if timeout is not None:
                remaining = timeout - (time.monotonic() - start)
                if remaining <= 0:
                    raise TimeoutError()
                wait = min(wait, remaining)
            self.listener.wait(wait)

    # -- event loop (the worker's hub) --------------------------------------------

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        self._hub = loop
        fd = self.listener.fileno()
        if fd is not None:
            loop.add_reader(fd, self._on_readable)
        else:
            loop.call_repeatedly(self.listener_poll_interval, self._on_readable)
        # Claims run on a thread of their own: the loop keeps feeding the pool
        # while the database answers, as it does with Redis' asynchronous BRPOP.
        if self._fetcher is None:
            self._fetcher = _Claimer(self)
            self._fetcher.start()
        loop.add_reader(self._fetcher.fileno(), self._on_claimed)
        loop.on_tick.add(self._on_tick)
        loop.call_repeatedly(self.polling_interval, self._deliver_all)
        # Messages published before we listened sent their wake-up to no one.
        loop.call_soon(self._deliver_all)

    def _on_readable(self) -> None:
        woken = self.listener.poll()
        if woken:
            self._deliver_all(woken)

    def _on_tick(self) -> None:
        for channel in list(self.channels):
            if channel.maybe_more and channel.credit() >= channel.refill_at():
                channel.deliver_ready()  # writes the pending acks in the same commit
            elif self._fetcher is None:
                channel.flush_acks(older_than=channel.ack_flush_interval)
            # (With a background claimer the keeper thread flushes lone acks.)

    def _on_claimed(self) -> None:
        """The background claimer finished claims: deliver them on the loop."""
        assert self._fetcher is not None
        error: BaseException | None = None
        for channel, outcome, limit in self._fetcher.take_done():
            channel.claiming -= limit
            if isinstance(outcome, BaseException):
                error = outcome
            elif channel in self.channels:
                channel.deliver_claimed(outcome, limit)
            else:
                _Claimer.give_back(channel, outcome)
        if error is not None:
            raise error  # a connection error: the consumer reconnects
        for channel in list(self.channels):
            again, channel.claim_again = channel.claim_again, False
            credit = channel.credit()
            if again and credit <= 0:
                channel.maybe_more = True  # claim once the pool frees some credit
            elif (again and credit > 0) or (channel.maybe_more and credit >= channel.refill_at()):
                channel.deliver_ready()


class _Claimer(threading.Thread):
    """Claims (with the pending acks) for the worker's event loop, off its thread.

    One request per channel at a time.  Finished claims wait in ``done`` and a
    byte on a pipe wakes the loop, which delivers them.  The claimed messages are
    in the channel's claim table from the start, so their leases are renewed and
    a clean shutdown gives back the ones never delivered.
    """

    def __init__(self, transport: Transport) -> None:
        super().__init__(name="celery-eventstore-claimer", daemon=True)
        self.transport = transport
        self._cond = threading.Condition()
        self._requests: dict[Channel, tuple[list[str], int]] = {}
        self._busy: Channel | None = None
        self._done: list[tuple[Channel, Any, int]] = []
        self._stopped = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)

    def fileno(self) -> int:
        return self._wake_r

    def request(self, channel: Channel, queues: list[str], limit: int) -> bool:
        """Ask for a claim unless one for ``channel`` is queued or running."""
        with self._cond:
            if self._stopped or channel in self._requests or self._busy is channel:
                return False
            self._requests[channel] = (queues, limit)
            self._cond.notify()
            return True

    def take_done(self) -> list[tuple[Channel, Any, int]]:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        with self._cond:
            done, self._done = self._done, []
        return done

    def run(self) -> None:
        while True:
            with self._cond:
                while not self._requests and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                channel, (queues, limit) = next(iter(self._requests.items()))
                del self._requests[channel]
                self._busy = channel
            outcome: Any
            try:
                outcome = channel.claim(queues, limit)
            except BaseException as exc:  # reported on the loop, which reconnects
                outcome = exc
            with self._cond:
                self._busy = None
                if not self._stopped:
                    self._done.append((channel, outcome, limit))
                    # Under the lock: stop() closes the pipe under it too.
                    os.write(self._wake_w, b"\0")
                    continue
            self.give_back(channel, outcome)
            return

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._requests.clear()
            self._cond.notify()
            done, self._done = self._done, []
            os.close(self._wake_w)
            os.close(self._wake_r)
        for channel, outcome, _ in done:
            self.give_back(channel, outcome)

    @staticmethod
    def give_back(channel: Channel, outcome: Any) -> None:
        """Restore claims that were never delivered (the consumer is closing)."""
        if isinstance(outcome, BaseException):
            return
        refs = [ref for ref in (
            channel.forget_claim(payload["properties"]["delivery_tag"]) for payload, _ in outcome
        ) if ref is not None]
        if refs:
            try:
                channel.store.restore(refs)
            except Exception as exc:  # their leases bring them back instead
                logger.warning("could not give back %d undelivered claim(s): %s", len(refs), exc)


class _Keeper(threading.Thread):
    """Renews leases while tasks run -- even when a task blocks the event loop
    (solo pool) -- flushes acks written from pool threads, and sweeps expired
    transient queues."""

    def __init__(self, transport: Transport) -> None:
        super().__init__(name="celery-eventstore-keeper", daemon=True)
        self.transport = transport
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        last_renew = last_sweep = time.monotonic()
        interval = min(
            [c.ack_flush_interval for c in self.transport.channels] or [DEFAULT_ACK_FLUSH_INTERVAL]
        )
        while not self._stopped.wait(max(interval / 2, 0.01)):
            now = time.monotonic()
            try:
                renew = now - last_renew >= 1.0
                for channel in list(self.transport.channels):
                    channel.flush_acks(older_than=channel.ack_flush_interval)
                    if renew:
                        channel.renew_leases()  # only those past half their lease
                if renew:
                    last_renew = now
                if now - last_sweep >= SWEEP_INTERVAL:
                    last_sweep = now
                    self.transport.store.sweep()
            except Exception as exc:  # the consumer sees the same fault and reconnects
                logger.warning("event store keeper: %s", exc)


def _for_delivery(message: Mapping[str, Any], tag: str, redelivered: bool) -> dict[str, Any]:
    """A copy of a stored message with this delivery's tag and redelivered flag.

    The tag (the claim id) also goes in the ``eventstore_claim`` header
    (:data:`celery_eventstore.backend.CLAIM_HEADER`): Celery copies message
    headers onto the task's request, so the result backend records each result
    with the claim it came from, and the store fences out a claim taken over.
    """
    payload = dict(message)
    payload["headers"] = {**(payload.get("headers") or {}), "eventstore_claim": tag}
    props = dict(payload.get("properties") or {})
    info = dict(props.get("delivery_info") or {})
    info["redelivered"] = redelivered
    props["delivery_info"] = info
    props["delivery_tag"] = tag
    payload["properties"] = props
    if redelivered:
        payload["redelivered"] = True
    return payload


def _publish_metadata(message: Mapping[str, Any]) -> dict[str, Any]:
    """What the history shows about a publish, from Celery's headers."""
    headers = message.get("headers") or {}
    info = (message.get("properties") or {}).get("delivery_info") or {}
    fields = {
        "task": headers.get("task"),
        "retries": headers.get("retries"),
        "eta": headers.get("eta"),
        "parent_id": headers.get("parent_id"),
        "root_id": headers.get("root_id"),
        "group": headers.get("group"),
        "origin": headers.get("origin"),
        "exchange": info.get("exchange"),
        "routing_key": info.get("routing_key"),
    }
    return {k: v for k, v in fields.items() if v not in (None, "")}


def _warn_stale(outcomes: Mapping[str, Outcome], what: str) -> None:
    stale = [d for d, o in outcomes.items() if o is Outcome.STALE]
    if stale:
        logger.warning(
            "%s of %d message(s) came too late: the lease ran out and the message was "
            "claimed again or settled (%s)", what, len(stale), ", ".join(stale[:5]),
        )
