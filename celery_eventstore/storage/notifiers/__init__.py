"""Wake-ups: how committed work reaches waiting consumers and result waiters.

A notifier is chosen apart from the dialect, as a seam of its own:

* ``notify`` -- PostgreSQL ``LISTEN/NOTIFY``: writers send on commit, and each
  process listens on one connection of its own, shared by its consumer and
  every thread waiting for a result (:mod:`.postgresql_notify`); behind
  PgBouncer's transaction pooling that connection goes straight to the server
  (the ``listen_url`` option);
* ``data_version`` -- SQLite change detection: a listener polls
  ``PRAGMA data_version`` and wakes when another connection committed
  (:mod:`.sqlite_data_version`); writers send nothing;
* ``poll`` -- nothing is sent and listeners never wake: consumers rely on their
  periodic poll (PgBouncer's transaction pooling without a ``listen_url``).

Wake-ups are addressed.  "Messages are ready" goes to one channel per store,
with the queue as payload, at most once per queue per :data:`READY_WINDOW`
from each process (:class:`ReadyThrottle`).  "A result was recorded" goes to a
channel derived from the task id (:meth:`Channels.result`), which only the
processes waiting for that task listen to.

Every mechanism answers to the same :class:`Listener` interface, so the transport
and the result backend never know which one runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa

from ...exceptions import ConfigurationError

logger = logging.getLogger(__name__)

#: The payload a listener returns when it cannot tell which queue woke it.
ANY_QUEUE = "*"

NOTIFY = "notify"
DATA_VERSION = "data_version"
POLL = "poll"

#: PostgreSQL keeps 63 bytes of a channel name and silently cuts the rest.
MAX_CHANNEL = 63
#: A process sends at most one "ready" NOTIFY per queue in this many seconds while
#: it publishes to the queue in a burst; what the window holds back is sent once,
#: as it closes.
READY_WINDOW = 0.01
#: Publishes to one queue at least this far apart are no burst: each notifies at
#: once, whatever the window.  A caller that waits for each task's result before
#: publishing the next must not wait for a window on every task (it would be
#: paced at one task per window).
READY_BURST_GAP = 0.004


def _digest(text: str, size: int) -> str:
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


class Channels:
    """The wake-up channel names of one store (its tables' namespace).

    Every name fits PostgreSQL's 63 bytes whatever the ``schema`` and
    ``table_prefix``: a namespace too long to spell out is replaced by a digest.
    """

    #: Suffixes after the namespace: "ready", and "r_" + 16 hex digits per task.
    _LONGEST_SUFFIX = len("r_") + 16

    def __init__(self, table_prefix: str, schema: str | None) -> None:
        namespace = f"{schema}.{table_prefix}" if schema else table_prefix
        #: Prefixes advisory lock keys, so stores sharing a database do not collide.
        self.namespace = namespace
        spelled = namespace
        if len(spelled) + self._LONGEST_SUFFIX > MAX_CHANNEL:
            spelled = f"eventstore_{_digest(namespace, 8)}_"
        self._channel_namespace = spelled
        #: Consumers listen here; the payload is the queue name.
        self.ready = f"{spelled}ready"

    def result(self, stream: str) -> str:
        """The channel on which "``stream``'s result was recorded" is sent; the
        payload is the stream id.  Only processes waiting for it listen there."""
        return f"{self._channel_namespace}r_{_digest(stream, 8)}"


class Listener:
    """Something a consumer waits on for "the store changed".

    :meth:`fileno` is a descriptor an event loop can watch (PostgreSQL LISTEN), or
    None when the listener can only be polled (then call :meth:`poll` on a timer).
    :meth:`poll` never blocks and returns the queues (or result streams) woken
    since the last call (``{ANY_QUEUE}`` when it cannot tell which); :meth:`wait`
    blocks up to ``timeout``.
    """

    def fileno(self) -> int | None:
        return None

    def poll(self) -> set[str]:
        raise NotImplementedError

    def wait(self, timeout: float) -> set[str]:
        raise NotImplementedError

    def close(self) -> None:
        """Stop listening (release the connection, or leave the shared one)."""


class SilentListener(Listener):
    """Never wakes: the caller's periodic poll is the only wake-up."""

    def poll(self) -> set[str]:
        return set()

    def wait(self, timeout: float) -> set[str]:
        time.sleep(max(timeout, 0.0))
        return set()


class Notifier:
    """Sends wake-ups from a writing transaction and makes listeners for them."""

    name = POLL
    #: Whether :meth:`send` sends anything (worth throttling).
    sends = False

    def send(self, conn: sa.Connection, channel: str, payloads: Iterable[str]) -> None:
        """Wake listeners of ``channel`` when ``conn``'s transaction commits."""

    def expression(
        self, channel: sa.ColumnElement[str], payload: sa.ColumnElement[str]
    ) -> sa.ColumnElement[Any] | None:
        """:meth:`send` of one payload as an SQL expression, to fold into a
        statement of the transaction; None where nothing is sent."""
        return None

    def listen(self, target: sa.Engine, channels: Iterable[str]) -> Listener:
        """A listener on ``channels``; ``target`` is the engine to listen through
        (for PostgreSQL: the ``listen_url``'s, or the store's own)."""
        return SilentListener()


def notifier_for(name: str, backend: str) -> Notifier:
    """The notifier called ``name`` for a database of kind ``backend``."""
    if name == POLL:
        return Notifier()
    if name == NOTIFY and backend == "postgresql":
        from .postgresql_notify import PostgreSQLNotifier

        return PostgreSQLNotifier()
    if name == DATA_VERSION and backend == "sqlite":
        from .sqlite_data_version import DataVersionNotifier

        return DataVersionNotifier()
    raise ConfigurationError(
        f"wake-up {name!r} does not work on {backend}: use "
        f"{NOTIFY!r} (PostgreSQL), {DATA_VERSION!r} (SQLite) or {POLL!r}"
    )


def default_notifier(backend: str) -> str:
    """The best wake-up a database of kind ``backend`` offers."""
    return {"postgresql": NOTIFY, "sqlite": DATA_VERSION}.get(backend, POLL)


class ReadyThrottle:
    """Bounds the "ready" NOTIFYs one process sends for a queue: a burst of
    publishes sends one at once and one as the window closes, not one each.

    :meth:`now` says which of a transaction's queues to notify in it: those not
    notified within :data:`READY_WINDOW`, and those whose last publish was at
    least ``burst_gap`` before (no burst: at most one NOTIFY per gap).  The others
    are handed to
    :meth:`later` once the transaction committed (never before: a consumer woken
    early would find nothing), and ``flush`` -- one transaction of its own --
    sends them when their window closes, on a thread of the throttle's.
    """

    def __init__(
        self, flush: Callable[[set[str]], None], window: float = READY_WINDOW,
        burst_gap: float = READY_BURST_GAP,
    ) -> None:
        self._flush = flush
        self.window = window
        self.burst_gap = burst_gap
        self._lock = threading.Lock()
        self._owing = threading.Condition(self._lock)
        self._sent: dict[str, float] = {}
        #: When each queue was last published to (notified or held).
        self._published: dict[str, float] = {}
        #: Queues held back, and when their transaction committed.
        self._owed: dict[str, float] = {}
        #: When the owed wake-ups are to go (None: nothing owed).
        self._due: float | None = None
        #: The one thread that sends them, started at the first held wake-up and
        #: kept: a busy publisher holds some back every window, and a thread
        #: started per window cost it more than the NOTIFY saved.
        self._sender: threading.Thread | None = None
        self._pid = os.getpid()

    def now(self, queues: Iterable[str]) -> tuple[set[str], set[str]]:
        """Split ``queues`` into those to notify now and those to notify later."""
        clock = time.monotonic()
        send, hold = set(), set()
        with self._lock:
            self._forked()
            for queue in queues:
                last = self._sent.get(queue)
                previous = self._published.get(queue)
                self._published[queue] = clock
                if (last is None or clock - last >= self.window
                        or previous is None or clock - previous >= self.burst_gap):
                    self._sent[queue] = clock
                    send.add(queue)
                else:
                    hold.add(queue)
            if len(self._sent) > 10_000:  # a bound, not a history
                self._sent = {q: t for q, t in self._sent.items() if clock - t < self.window}
            if len(self._published) > 10_000:
                self._published = {
                    q: t for q, t in self._published.items() if clock - t < self.burst_gap
                }
        return send, hold

    def later(self, queues: set[str]) -> None:
        """Notify ``queues`` (whose transaction has committed) when the window closes."""
        if not queues:
            return
        clock = time.monotonic()
        with self._lock:
            self._forked()
            for queue in queues:
                self._owed.setdefault(queue, clock)
            if self._due is None:
                opened = min(self._sent.get(q, clock) for q in queues)
                self._due = opened + self.window
                if self._sender is None:
                    self._sender = threading.Thread(
                        target=self._send_when_due, name="eventstore-ready-wakeups", daemon=True
                    )
                    self._sender.start()
                else:
                    self._owing.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is owed now and end the sender thread (it would otherwise
        keep the store alive for the life of the process).  A later publish
        that holds a wake-up back starts a sender again."""
        with self._lock:
            self._forked()
            sender, self._sender = self._sender, None
            due = self._take_owed()
            self._owing.notify_all()
        if due:
            self._send(due)
        if sender is not None and sender is not threading.current_thread():
            # Bounded: a send in flight ends within the store's connect and
            # statement timeouts, and the thread is a daemon.
            sender.join(timeout)

    def _send_when_due(self) -> None:
        me = threading.current_thread()
        while True:
            with self._lock:
                while self._sender is me and (
                    self._due is None or time.monotonic() < self._due
                ):
                    self._owing.wait(None if self._due is None else self._due - time.monotonic())
                if self._sender is not me:
                    return  # closed: close() sent what was owed
                due = self._take_owed()
            if due:
                self._send(due)

    def _take_owed(self) -> set[str]:
        """The owed queues still to notify, marked sent; the lock is held."""
        owed, self._owed, self._due = self._owed, {}, None
        clock = time.monotonic()
        # A queue notified by a transaction decided after the held one
        # committed is covered: that NOTIFY comes with a later commit.
        due = {q for q, since in owed.items() if self._sent.get(q, 0.0) < since}
        for queue in due:
            self._sent[queue] = clock
        return due

    def _send(self, due: set[str]) -> None:
        try:
            self._flush(due)
        except Exception as exc:  # noqa: BLE001 - the consumers' poll covers a lost wake-up
            logger.info("could not send %d wake-up(s): %s", len(due), exc)

    def _forked(self) -> None:
        """A forked child inherits no sender thread: start afresh."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._sent, self._owed, self._due, self._sender = {}, {}, None, None
            self._published = {}
            self._owing = threading.Condition(self._lock)
