"""kombu transport on the celery_eventstore event store.

``Channel`` keeps kombu's verbs (publish, get, consume, ack, reject, restore) and
the routing; what a consumer holds and owes -- prefetch credit, the claim in
flight, held claims and their leases, buffered acks -- is its ``QoS``'s, and the
worker's event loop is served by a ``Poller``: both in :mod:`.consumer`.

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
* Server-side ETA/countdown: a message is not delivered before it is due, and
  is claimed when it is due -- consumers set a timer for the next ETA of their
  queues instead of waiting for the next poll.
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
* ``max_claims``: a message whose runs ended this many times without an outcome
  (a lease lost after the task started, a requeue) is dead-lettered (default 5); a
  lease lost before the task started counts toward three times as many.
* ``priority_order``: ``"redis"`` (0 is served first, the default) or ``"amqp"``
  (9 is served first).
* ``polling_interval``: seconds between safety-net polls (default 1.0); neither
  new messages nor ETAs wait for one.
* ``ack_flush_interval``: longest time an ack waits to be written with others
  (default 0.1 s).  A crash inside that window redelivers the message after its
  lease, as a crash just before the ack would -- unless the task's result is
  already recorded in the store: then the message is settled, not run again.
* ``claim_batch``: most messages claimed in one round trip when prefetch is
  unlimited (default 100).
* ``table_prefix``, ``schema``, ``auto_migrate`` (default True), ``notify``
  (default True; turn off behind PgBouncer transaction pooling unless
  ``listen_url`` is given), ``wakeup`` (``"notify"``, ``"data_version"`` or
  ``"poll"``; default: the database's own), ``listen_url`` (a URL straight to the
  database for the process's one LISTEN connection, when the broker URL goes
  through PgBouncer),
  ``max_message_size``, ``async_commit`` (default True: claims, acks and lease
  renewals do not wait for the disk; publishes and results always do),
  ``partitioned_log`` (PostgreSQL: create the log partitioned by day, when the
  first worker creates the schema; workers then make the coming days' partitions
  twice a day): passed to the store.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from queue import Empty
from typing import Any

from kombu import serialization
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments

from . import control  # noqa: F401 - registers `inspect scheduled` for held ETA tasks
from .consumer import Batch, Keeper, Poller, QoS, handing_over
from .exceptions import DatabaseUnavailable
from .monitoring import announce
from .storage import (
    BROKER_PREFIX,
    Binding,
    ClaimedMessage,
    EventStore,
    Listener,
    NewMessage,
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
#: The most claim rounds one blocking ``drain_events`` runs back to back while
#: each settles all it took up and delivers nothing (a run of expired messages).
MOST_SETTLING_ROUNDS = 100
#: How long a process trusts what it read of other processes' routing state.
ROUTING_CACHE_SECONDS = 1.0

#: Serialisations of control broadcasts the transport reads (to make revokes
#: durable); nothing that can run code when loaded.
CONTROL_CONTENT_TYPES = ("application/json", "application/x-msgpack", "application/x-yaml")

STORE_OPTIONS = (
    "table_prefix", "schema", "auto_migrate", "notify", "wakeup", "listen_url",
    "max_message_size", "async_commit", "engine_options", "partitioned_log",
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
        self._noack_queues: set[str] = set()
        self._declared: dict[str, QueueInfo] = {}
        self._routing_cache: dict[str, tuple[float, Any]] = {}
        self._last_touch = 0.0

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
            with self.connection.joined() as conn:
                self.store.declare_queue(info, connection=conn)
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
        with self.connection.joined() as conn:
            self.store.bind(
                Binding(exchange, queue, routing_key or "", pattern, exchange_type),
                connection=conn,
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
        publish_id, message = _publish_id(message)
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
                delivery = _per_queue(publish_id, queue)
                durable.append(
                    NewMessage(
                        # A message without a Celery task id is a stream of its own.
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
            self.connection.publish(durable)
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
            self.qos.ack_at_once(message.delivery_tag)
        return message

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        for _ in range(MOST_SETTLING_ROUNDS):
            for payload, _ in self.claim([queue], 1):
                return payload
            if not self.qos.last_claim_filled:
                break  # nothing was due; else the round settled one: look again
        raise Empty()

    def _get_many(self, queues: Sequence[str], timeout: float | None = None) -> None:
        if not self.deliver_ready(queues):
            raise Empty()

    def consuming_queues(self) -> list[str]:
        """The queues this channel's consumers read (none without consumers)."""
        return list(self._active_queues) if self._consumers else []

    def deliver_ready(self, queues: Sequence[str]) -> int:
        """Claim what the prefetch credit allows and hand it to the consumers, on
        this thread (the blocking ``drain_events`` path; the event loop's is the
        :class:`~.consumer.Poller`)."""
        if not queues or not self._consumers:
            return 0
        batch: Batch = []
        # A round that settled what it took up (expired, finished, dead-lettered
        # messages) brings nothing, though more may wait: claim again rather
        # than wait for a wake-up.  Each such round settles its whole limit.
        for _ in range(MOST_SETTLING_ROUNDS):
            limit = self.qos.reserve()
            if not limit:
                return 0
            try:
                batch = self.claim(queues, limit)
            except BaseException:
                self.qos.claim_failed()
                raise
            self.qos.claim_done(len(batch))
            if batch or not self.qos.last_claim_filled:
                break
        self.deliver(batch)
        return len(batch)

    def deliver(self, batch: Batch) -> None:
        for payload, queue in batch:
            self.connection._deliver(payload, queue)

    def claim(self, queues: Sequence[str], limit: int) -> Batch:
        """Write the pending acks and claim up to ``limit`` messages from ``queues``,
        in one transaction (transient queues take one more)."""
        durable = [q for q in queues if not self._queue_info(q).transient]
        transient = [q for q in queues if q not in durable]
        out = [
            (_for_delivery(m.message, m.claim, m.redelivered, self._claim_state(m)), m.queue)
            for m in self.qos.claim(durable, limit, noack=self._noack_queues)
        ]
        if transient and len(out) < limit:
            self._touch(transient)
            for queue, payload in self.store.take_transient(transient, limit - len(out)):
                out.append((_for_delivery(payload, uuid.uuid4().hex, False), queue))
        return out

    def _claim_state(self, claimed: ClaimedMessage) -> tuple[str, Any] | None:
        """What the result backend may decide this claim's result on: the
        store's identity (a backend on another store must not use it) and the
        stream's state as the claim left it."""
        return None if claimed.state is None else (self.store.identity, claimed.state)

    def _touch(self, queues: Sequence[str]) -> None:
        expiries = [self._queue_info(q).expires for q in queues]
        shortest = min((e for e in expiries if e), default=None)
        now = time.monotonic()
        if shortest is not None and now - self._last_touch > shortest / 3:
            self._last_touch = now
            self.store.touch_queues(list(queues))

    # -- outcomes (the bookkeeping is the QoS's) ---------------------------------

    def _restore(self, message: Any) -> None:
        self.qos.restore([message.delivery_tag])

    _restore_at_beginning = _restore

    def close(self) -> None:
        if self._qos is not None:
            self._qos.flush_acks_at_close()
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
        # Monitors see the verdicts the store makes itself (expiry, revoke, purge...).
        announce(self.store, options)
        self.consumer_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._listener: Listener | None = None
        self._keeper: Keeper | None = None
        #: Drives the consumers while registered with the worker's event loop.
        self.poller: Poller | None = None
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
        if self.poller is not None:
            self.poller.close()  # gives back what it claimed and did not deliver
            self.poller = None
        super().close_connection(connection)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    @contextlib.contextmanager
    def joined(self) -> Iterator[Any]:
        """The caller's connection a publish joins (``celery_eventstore.atomic``, or
        an automatic binding), or None outside one."""
        from .enqueue import joined

        with joined(self.store) as conn:
            yield conn

    def publish(self, messages: Sequence[NewMessage]) -> None:
        """Publish durable messages: into the caller's transaction inside an
        ``atomic`` block (or an automatic binding), else on the store's own."""
        from .enqueue import publish

        publish(self.store, messages)

    @property
    def listener(self) -> Listener:
        if self._listener is None:
            self._listener = self.store.listener()
        return self._listener

    def on_consume(self) -> None:
        """The first consumer starts the lease keeper (renewals, ack flushes, sweeps)."""
        if self._keeper is None:
            self._keeper = Keeper(self)
            self._keeper.start()

    def _deliver(self, message: Any, queue: str | None) -> None:
        with handing_over():
            super()._deliver(message, queue)

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
            wait = min(self.polling_interval, self._until_due())
            if timeout is not None:
                remaining = timeout - (time.monotonic() - start)
                if remaining <= 0:
                    raise TimeoutError()
                wait = min(wait, remaining)
            self.listener.wait(wait)

    def _until_due(self) -> float:
        """Seconds until the earliest ETA the channels know of: 0 when one is due
        (then forgotten: the claim it brings looks up the next one)."""
        now = time.monotonic()
        dues = []
        for channel in list(self.channels):
            qos = channel._qos  # none yet: it never claimed, so it knows no ETA
            if qos is None:
                continue
            if qos.due_now():
                return 0.0
            due = qos.next_due()
            if due is not None:
                dues.append(due - now)
        return min(dues, default=math.inf)

    # -- event loop (the worker's hub) --------------------------------------------

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        if self.poller is None:
            self.poller = Poller(self)
        self.poller.register(loop)


def _for_delivery(
    message: Mapping[str, Any], tag: str, redelivered: bool, claim_state: Any = None
) -> dict[str, Any]:
    """A copy of a stored message with this delivery's tag and redelivered flag.

    In a Celery task message the tag (the claim id) also goes in the
    ``eventstore_claim`` header (:data:`celery_eventstore.backend.CLAIM_HEADER`):
    Celery copies message headers onto the task's request, so the result backend
    records each result with the claim it came from, and the store fences out a
    claim taken over.  ``claim_state`` (the store's identity and the stream's
    state as the claim left it) goes in the ``eventstore_claim_state`` property
    (:data:`celery_eventstore.backend.CLAIM_STATE`), which Celery hands to the
    pool process with the request but never publishes again (a retry copies the
    headers): the result is then written without reading the stream.  Other
    messages keep the headers they were published with.
    """
    payload = dict(message)
    headers = payload.get("headers") or {}
    props = dict(payload.get("properties") or {})
    if "task" in headers:  # Celery's task protocol 2 names the task in a header
        payload["headers"] = {**headers, "eventstore_claim": tag}
        # A task that ignores its result writes none: no state to carry to it.
        if claim_state is not None and headers.get("ignore_result") is not True:
            props["eventstore_claim_state"] = claim_state
    info = dict(props.get("delivery_info") or {})
    info["redelivered"] = redelivered
    props["delivery_info"] = info
    props["delivery_tag"] = tag
    payload["properties"] = props
    if redelivered:
        payload["redelivered"] = True
    return payload


#: The message property that keeps one publish's delivery id across kombu's
#: retries of it (not stored: it is taken out of the message written).
PUBLISH_ID = "eventstore_delivery"


def _publish_id(message: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """This publish's delivery id, and the message to store.

    kombu retries a publish that met a connection error (``Connection.ensure``)
    with the same properties dict.  When the error came after the commit had
    landed, the retry is the same message again: the id kept in that dict makes
    it the same delivery, which the store records once (a ``Publish`` of a
    delivery it holds is a no-op).  A new publish, even of the same task id,
    gets a new dict from kombu, so a new id.
    """
    props = message.get("properties")
    if not isinstance(props, dict):
        return uuid.uuid4().hex, message
    publish_id = props.get(PUBLISH_ID)
    if not isinstance(publish_id, str):
        publish_id = props[PUBLISH_ID] = uuid.uuid4().hex
    stored = {k: v for k, v in props.items() if k != PUBLISH_ID}
    return publish_id, {**message, "properties": stored}


def _per_queue(publish_id: str, queue: str) -> str:
    """The delivery id of one publish's copy in ``queue``: kombu hands a message
    routed to several queues to ``_put`` once per queue, with one properties dict."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{publish_id}/{queue}").hex


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
