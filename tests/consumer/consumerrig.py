"""A consuming transport on a real store, driven by hand: no worker, no pool.

:class:`Rig` opens a kombu connection on the event store, consumes one queue with
a callback that only records the messages, and registers the transport with a
:class:`FakeHub` -- the few methods of Celery's event loop a transport uses -- whose
callbacks the test calls itself, in the order the scenario needs.  Claims still
run on the transport's own claimer thread, against the database.

:class:`TcpProxy` stands between the transport and PostgreSQL so a test can cut
the connection and bring it back.
"""

from __future__ import annotations

import select
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from typing import Any

import kombu
import sqlalchemy as sa

from celery_eventstore import stores
from celery_eventstore.consumer import Poller, QoS

QUEUE = "work"
#: Transport options under which nothing happens by itself: the keeper leaves
#: the acks to the claims (the safety-net poll only runs in FakeHub.run_once).
QUIET: dict[str, Any] = {"polling_interval": 3600, "ack_flush_interval": 3600}


class Timer:
    """What ``call_repeatedly`` and ``call_at`` return: something to cancel."""

    def __init__(
        self, seconds: float, callback: Callable[[], Any], when: float | None = None
    ) -> None:
        self.seconds = seconds
        self.callback = callback
        #: When a one-off timer fires (time.monotonic()); None for a repeating one.
        self.when = when
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeHub:
    """The parts of Celery's hub a transport registers with; nothing runs by
    itself.  :meth:`run_once` turns the loop once, as the hub would."""

    def __init__(self) -> None:
        self.readers: dict[int, Callable[[], Any]] = {}
        self.on_tick: set[Callable[[], Any]] = set()
        self.timers: list[Timer] = []
        #: One-off timers (``call_at``), fired by :meth:`run_once` once due.
        self.at: list[Timer] = []
        self.soon: list[Callable[[], Any]] = []

    def add_reader(self, fd: int, callback: Callable[..., Any], *args: Any) -> None:
        self.readers[fd] = partial(callback, *args)

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        self.soon.append(partial(callback, *args))

    def call_repeatedly(self, seconds: float, callback: Callable[..., Any], *args: Any) -> Timer:
        timer = Timer(seconds, partial(callback, *args))
        self.timers.append(timer)
        return timer

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> Timer:
        timer = Timer(0.0, partial(callback, *args), when)
        self.at.append(timer)
        return timer

    def next_at(self) -> Timer | None:
        """The live one-off timer that fires first."""
        live = [t for t in self.at if not t.cancelled]
        return min(live, key=lambda t: t.when or 0.0, default=None)

    def fire(self, timer: Timer) -> None:
        """Fire one one-off timer now, as the loop does once it is due."""
        self.at.remove(timer)
        timer.callback()

    def run_once(self, timeout: float = 0.01) -> None:
        """Soon callbacks, ready readers, every live timer, the one-off timers
        that are due, then the tick."""
        soon, self.soon = self.soon, []
        for callback in soon:
            callback()
        ready, _, _ = select.select(list(self.readers), [], [], timeout)
        for fd in ready:
            if fd in self.readers:
                self.readers[fd]()
        for timer in list(self.timers):
            if not timer.cancelled:
                timer.callback()
        now = time.monotonic()
        for timer in [t for t in self.at if (t.when or 0.0) <= now]:
            self.at.remove(timer)
            if not timer.cancelled:
                timer.callback()
        for callback in list(self.on_tick):
            callback()


class Rig:
    """One consumer channel on queue :data:`QUEUE` and a producer, on ``url``."""

    def __init__(self, url: str, options: dict[str, Any], prefetch: int) -> None:
        self.url = url
        self.options = options
        self.connection = kombu.Connection(f"eventstore+{url}", transport_options=options)
        self.connection.connect()
        self.transport = self.connection.transport
        #: Where the test reads the event log (the transport's own store by default).
        self.log = self.transport.store
        self.channel = self.connection.channel()
        self.producer = kombu.Producer(self.connection.channel())
        kombu.Queue(QUEUE, routing_key=QUEUE)(self.channel).declare()
        #: Every message delivered to the consumer, in order.
        self.delivered: list[kombu.Message] = []
        self.channel.basic_qos(0, prefetch, False)
        self.channel.basic_consume(QUEUE, False, self.delivered.append, "rig")
        self.hub = FakeHub()
        self.transport.register_with_event_loop(self.connection.connection, self.hub)

    @property
    def qos(self) -> QoS:
        qos: QoS = self.channel.qos
        return qos

    @property
    def poller(self) -> Poller:
        assert self.transport.poller is not None
        return self.transport.poller

    # -- making work -------------------------------------------------------

    def publish(
        self, count: int = 1, *, eta: float | None = None, expiration: float | None = None
    ) -> list[str]:
        """Publish ``count`` messages, each a stream of its own, due at ``eta``
        (epoch seconds, as Celery's ``eta`` header says) or now, and living
        ``expiration`` seconds (kombu's per-message TTL) or for ever; their ids."""
        ids = []
        headers: dict[str, Any] = {}
        if eta is not None:
            headers["eta"] = datetime.fromtimestamp(eta, timezone.utc).isoformat()
        for _ in range(count):
            task_id = uuid.uuid4().hex
            self.producer.publish(
                {"id": task_id}, routing_key=QUEUE, headers={"id": task_id, **headers},
                expiration=expiration,
            )
            ids.append(task_id)
        return ids

    # -- turning the loop by hand ------------------------------------------

    def wake(self) -> None:
        """A wake-up for the queue, as the listener would report it."""
        self.poller.on_wake({QUEUE})

    def claim_finished(self, timeout: float = 10.0) -> bool:
        """Wait until the claimer has a finished claim for the loop to take."""
        ready, _, _ = select.select([self.poller.claimer.fileno()], [], [], timeout)
        return bool(ready)

    def take_claim(self, timeout: float = 10.0) -> None:
        """Wait for the claim in flight, then let the loop deliver it."""
        assert self.claim_finished(timeout), "no claim finished"
        self.poller.on_claimed()

    def claim_cycle(self) -> None:
        """A wake-up and the claim it starts, delivered."""
        self.wake()
        self.take_claim()

    # -- reading what happened ---------------------------------------------

    def ids(self, messages: list[kombu.Message] | None = None) -> list[str]:
        return [m.headers["id"] for m in (self.delivered if messages is None else messages)]

    def types(self, task_id: str) -> list[str]:
        return [e.type for e in self.log.read_stream(task_id)]

    def count(self, task_id: str, event_type: str) -> int:
        return self.types(task_id).count(event_type)

    def unacked(self) -> list[kombu.Message]:
        return [m for m in self.delivered if not m.acknowledged]

    def close(self) -> None:
        self.connection.close()
        forget_stores(self.url)


def forget_stores(url: str) -> None:
    """Close and drop the stores the transport shares in this process for ``url``."""
    with stores._lock:
        for key in [k for k in stores._stores if url in k[0]]:
            stores._stores.pop(key).close()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
    return value


class TcpProxy(threading.Thread):
    """Forwards 127.0.0.1:``port`` to ``target``; :meth:`cut` drops every
    connection and refuses new ones until :meth:`restore`."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(name="tcp-proxy", daemon=True)
        self.target = target
        self._lock = threading.Lock()
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._stopped = False
        self._server = self._listen(0)
        self.port: int = self._server.getsockname()[1]

    def _listen(self, port: int) -> socket.socket:
        server = socket.socket()
        try:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1", port))
            server.listen(16)
        except OSError:
            server.close()
            raise
        return server

    def url(self, url: str) -> str:
        """``url`` (an SQLAlchemy URL) pointing at the proxy."""
        return sa.make_url(url).set(host="127.0.0.1", port=self.port).render_as_string(
            hide_password=False
        )

    def run(self) -> None:
        while not self._stopped:
            with self._lock:
                server = self._server
                sockets = [s for s in (server,) if s is not None] + list(self._pairs)
            try:
                ready, _, _ = select.select(sockets, [], [], 0.05)
            except (OSError, ValueError):  # a socket closed by cut(): look again
                continue
            for sock in ready:
                if sock is server:
                    self._accept(server)
                else:
                    self._forward(sock)

    def _accept(self, server: socket.socket) -> None:
        try:
            client, _ = server.accept()
        except OSError:
            return
        upstream = socket.create_connection(self.target)
        with self._lock:
            self._pairs[client] = upstream
            self._pairs[upstream] = client

    def _forward(self, sock: socket.socket) -> None:
        with self._lock:
            peer = self._pairs.get(sock)
        if peer is None:
            return
        try:
            data = sock.recv(65536)
            if data:
                peer.sendall(data)
                return
        except OSError:
            pass
        self._drop(sock, peer)

    def _drop(self, *socks: socket.socket) -> None:
        with self._lock:
            for sock in socks:
                self._pairs.pop(sock, None)
                sock.close()

    def cut(self) -> None:
        with self._lock:
            if self._server is not None:
                self._server.close()
                self._server = None
            pairs = list(self._pairs)
        for sock in pairs:
            with self._lock:
                self._pairs.pop(sock, None)
            sock.close()

    def restore(self) -> None:
        # The listening socket cut() closed may take a moment to free its port
        # (the forwarding thread can be inside select() on it).
        deadline = time.monotonic() + 5
        while True:
            with self._lock:
                if self._server is not None:
                    return
                try:
                    self._server = self._listen(self.port)
                    return
                except OSError:
                    if time.monotonic() > deadline:
                        raise
            time.sleep(0.01)

    def stop(self) -> None:
        self.cut()
        self._stopped = True
        self.join(5)
