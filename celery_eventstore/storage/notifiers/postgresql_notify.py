"""PostgreSQL ``LISTEN/NOTIFY`` wake-ups; works with psycopg2 and psycopg 3.

Each process holds **one** LISTEN connection per database it listens to, a
:class:`Switchboard`, shared by the consumer and by every thread waiting for a
result: each of them is a :class:`Subscription` to some channels.  A thread of
the switchboard's own does all the connection's I/O -- LISTEN, UNLISTEN,
reading notifications -- and hands each notification to the subscriptions of
its channel.  So a thread in ``AsyncResult.get()`` costs a channel on that
connection, not a connection; and a process listens only to the result
channels of the tasks it waits for, so other tasks' results never wake it.

When the connection is lost the switchboard connects again by itself (with a
growing pause), listens again, and wakes every subscription with
``ANY_QUEUE``: something may have committed while nobody listened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import sqlalchemy as sa

from ...exceptions import DatabaseUnavailable
from . import ANY_QUEUE, NOTIFY, Listener, Notifier

logger = logging.getLogger(__name__)

#: Pauses between attempts to connect again after the LISTEN connection was lost.
RECONNECT_PAUSES = (0.1, 0.5, 1.0, 2.0)
#: How long a new subscription waits for its LISTEN before it gives up waiting
#: (it stays subscribed; its owner's periodic poll covers the gap).
SUBSCRIBE_TIMEOUT = 10.0


class PostgreSQLNotifier(Notifier):
    name = NOTIFY
    sends = True

    def send(self, conn: sa.Connection, channel: str, payloads: Iterable[str]) -> None:
        # pg_notify is transactional: listeners hear it only if we commit.
        for payload in sorted(set(payloads)):
            conn.execute(sa.select(sa.func.pg_notify(channel, payload)))

    def expression(
        self, channel: sa.ColumnElement[str], payload: sa.ColumnElement[str]
    ) -> sa.ColumnElement[Any]:
        return sa.func.pg_notify(channel, payload)

    def listen(self, target: sa.Engine, channels: Iterable[str]) -> Listener:
        return switchboard_for(target).subscribe(channels)


@contextlib.contextmanager
def _lost_on_error() -> Iterator[None]:
    """A LISTEN connection that fails has lost the server (it only ever waits):
    say so with the store's connection error, which Celery reconnects on."""
    try:
        yield
    except DatabaseUnavailable:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DatabaseUnavailable(f"lost the LISTEN connection to the database: {first}") from exc


def readable(fd: int, timeout: float | None) -> bool:
    """Wait up to ``timeout`` seconds (None: for ever) for ``fd`` to be readable.
    poll() where there is one: select() fails for descriptors past FD_SETSIZE
    (1024), which a busy worker process can reach."""
    return bool(ready_among([fd], timeout))


def ready_among(fds: list[int], timeout: float | None) -> list[int]:
    """Those of ``fds`` readable within ``timeout`` seconds (None: for ever)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        wait = None if timeout is None else max(timeout, 0.0) * 1000
        return [fd for fd, _ in poller.poll(wait)]
    ready, _, _ = select.select(fds, [], [], timeout)
    return list(ready)


class _ListenConnection:
    """One autocommit DBAPI connection, outside any pool (a pooled connection
    would be handed to other work and lose its LISTEN)."""

    def __init__(self, engine: sa.Engine) -> None:
        args, kwargs = engine.dialect.create_connect_args(engine.url)
        # LISTEN needs no prepared statements: never prepare (PgBouncer-safe).
        kwargs.pop("prepare_threshold", None)
        with _lost_on_error():
            self.conn: Any = engine.dialect.connect(*args, **kwargs)
            self.psycopg2 = engine.dialect.driver == "psycopg2"
            if self.psycopg2:
                self.conn.set_isolation_level(0)
            else:
                self.conn.autocommit = True

    def fileno(self) -> int:
        return int(self.conn.fileno())

    def execute(self, sql: str) -> None:
        with _lost_on_error():
            if self.psycopg2:
                with contextlib.closing(self.conn.cursor()) as cur:
                    cur.execute(sql)
            else:
                self.conn.execute(sql)

    def notifications(self) -> list[tuple[str, str]]:
        """The (channel, payload) pairs received so far."""
        with _lost_on_error():
            if self.psycopg2:
                self.conn.poll()
                got = [(n.channel, n.payload) for n in self.conn.notifies]
                self.conn.notifies.clear()
                return got
            return [(n.channel, n.payload) for n in self.conn.notifies(timeout=0)]

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - closing a dead connection is not an error
            pass


def _drain(fd: int) -> None:
    """Empty a wake-up pipe without ever blocking: one read, and only when it is
    readable (eventlet's os.read waits on an empty non-blocking pipe instead of
    raising; what one read leaves makes the next wait return at once)."""
    if ready_among([fd], 0):
        with contextlib.suppress(BlockingIOError):
            os.read(fd, 65536)


def _quoted(channel: str) -> str:
    return '"' + channel.replace('"', '""') + '"'


class Switchboard:
    """The process's LISTEN connection to one database, shared by subscriptions."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        #: channel -> the subscriptions listening to it.
        self._subs: dict[str, set[Subscription]] = {}
        #: Channels LISTENed on the live connection.
        self._listening: set[str] = set()
        #: Set by the switchboard's thread when it has caught up with the channels
        #: asked for at the time (``_asked`` bumps on each change).
        self._asked = 0
        self._done = 0
        self._caught_up = threading.Condition(self._lock)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._conn: _ListenConnection | None = None
        self._connect_error: Exception | None = None
        #: The last request (``_asked``) a failure to connect or listen answered.
        self._failed_at = 0
        #: A connection was lost: its subscriptions may have missed wake-ups.
        self._lost = False
        self._thread = threading.Thread(
            target=self._run, name="celery-eventstore-listen", daemon=True
        )
        self._thread.start()

    # -- called by subscriptions (any thread) ----------------------------------

    def subscribe(self, channels: Iterable[str]) -> Subscription:
        """A new subscription to ``channels``, returned once they are LISTENed
        (so nothing committed after this call goes unheard).  Raises
        :class:`DatabaseUnavailable` when the database cannot be reached."""
        sub = Subscription(self, frozenset(channels))
        with self._lock:
            for channel in sub.channels:
                self._subs.setdefault(channel, set()).add(sub)
            ticket = self._ask()
            deadline = time.monotonic() + SUBSCRIBE_TIMEOUT
            # An error counts only if it answers this request (an older one is
            # what the thread is trying to get past now).
            while self._done < ticket and self._failed_at < ticket:
                if not self._caught_up.wait(max(deadline - time.monotonic(), 0)):
                    break
            failed = self._done < ticket and self._failed_at >= ticket
            error = self._connect_error if failed else None
        if error is not None:
            sub.close()
            raise DatabaseUnavailable(f"cannot listen for wake-ups: {error}") from error
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            for channel in sub.channels:
                subs = self._subs.get(channel)
                if subs is not None:
                    subs.discard(sub)
                    if not subs:
                        del self._subs[channel]
            self._ask()

    def _ask(self) -> int:
        """Tell the thread the channels changed (under the lock); its ticket."""
        self._asked += 1
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")
        return self._asked

    # -- the switchboard's thread --------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while True:
            try:
                if self._conn is None:
                    if not self._wanted():
                        self._wait_for_change(None)  # no one listens: no connection yet
                        continue
                    self._connect()
                    failures = 0
                self._serve()
            except Exception as exc:  # noqa: BLE001 - lost: connect again, wake everyone
                self._drop(exc)
                failures += 1
                time.sleep(RECONNECT_PAUSES[min(failures, len(RECONNECT_PAUSES)) - 1])

    def _wanted(self) -> bool:
        with self._lock:
            return bool(self._subs)

    def _wait_for_change(self, conn: _ListenConnection | None) -> None:
        """Block until the channels change or (with ``conn``) a notification comes."""
        fds = [self._wake_r] if conn is None else [conn.fileno(), self._wake_r]
        if self._wake_r in ready_among(fds, None):
            _drain(self._wake_r)

    def _connect(self) -> None:
        conn = _ListenConnection(self._engine)
        with self._lock:
            self._conn = conn
            self._connect_error = None
            self._listening = set()
            again, self._lost = self._lost, False
        self._sync()
        if again:  # something may have committed while no one listened
            self._broadcast({ANY_QUEUE})

    def _drop(self, exc: Exception) -> None:
        conn = self._conn
        with self._lock:
            self._conn = None
            self._listening = set()
            self._connect_error = exc
            self._failed_at = self._asked
            self._lost = self._lost or conn is not None
            self._caught_up.notify_all()
        if conn is not None:
            logger.info("lost the LISTEN connection, connecting again: %s", exc)
            conn.close()

    def _serve(self) -> None:
        """Catch up with the channels asked for, hand out what came meanwhile (a
        LISTEN's reply may carry notifications), then wait for more."""
        conn = self._conn
        assert conn is not None
        self._sync()
        self._deliver(conn.notifications())
        self._wait_for_change(conn)
        self._deliver(conn.notifications())

    def _sync(self) -> None:
        """LISTEN and UNLISTEN until the connection hears exactly the channels asked."""
        conn = self._conn
        assert conn is not None
        with self._lock:
            ticket = self._asked
            wanted = set(self._subs)
            listening = set(self._listening)
        for channel in sorted(wanted - listening):
            conn.execute(f"LISTEN {_quoted(channel)}")
        for channel in sorted(listening - wanted):
            conn.execute(f"UNLISTEN {_quoted(channel)}")
        with self._lock:
            self._listening = wanted
            self._done = max(self._done, ticket)
            self._caught_up.notify_all()

    def _deliver(self, notifications: list[tuple[str, str]]) -> None:
        with self._lock:
            for channel, payload in notifications:
                for sub in self._subs.get(channel, ()):
                    sub.deliver({payload})

    def _broadcast(self, payloads: set[str]) -> None:
        with self._lock:
            subs = {sub for subs in self._subs.values() for sub in subs}
        for sub in subs:
            sub.deliver(payloads)


class Subscription(Listener):
    """Some channels of the process's :class:`Switchboard`, for one waiter.

    :meth:`fileno` (made on first use, for an event loop) turns readable when a
    wake-up is waiting; :meth:`wait` blocks a thread until one comes.
    """

    def __init__(self, board: Switchboard, channels: frozenset[str]) -> None:
        self.board = board
        self.channels = channels
        self._cond = threading.Condition()
        self._woken: set[str] = set()
        self._pipe: tuple[int, int] | None = None
        self._closed = False

    def deliver(self, payloads: set[str]) -> None:
        with self._cond:
            if self._closed:
                return
            self._woken |= payloads
            self._cond.notify_all()
            if self._pipe is not None:
                with contextlib.suppress(BlockingIOError):
                    os.write(self._pipe[1], b"\0")

    def fileno(self) -> int:
        with self._cond:
            if self._pipe is None:
                read, write = os.pipe()
                os.set_blocking(read, False)
                os.set_blocking(write, False)
                self._pipe = (read, write)
                if self._woken:
                    os.write(write, b"\0")
            return self._pipe[0]

    def poll(self) -> set[str]:
        with self._cond:
            if self._pipe is not None:
                _drain(self._pipe[0])
            woken, self._woken = self._woken, set()
            return woken

    def wait(self, timeout: float) -> set[str]:
        with self._cond:
            if not self._woken and timeout > 0:
                self._cond.wait(timeout)
        return self.poll()

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            pipe, self._pipe = self._pipe, None
        self.board.unsubscribe(self)
        if pipe is not None:
            for fd in pipe:
                with contextlib.suppress(OSError):
                    os.close(fd)


# -- one switchboard per database per process ------------------------------------

_boards: dict[str, Switchboard] = {}
_boards_lock = threading.Lock()


def switchboard_for(engine: sa.Engine) -> Switchboard:
    """This process's switchboard for the database ``engine`` connects to."""
    key = engine.url.render_as_string(hide_password=False)
    with _boards_lock:
        board = _boards.get(key)
        if board is None:
            board = _boards[key] = Switchboard(engine)
        return board


def _forget_in_child() -> None:
    # A forked child has none of its parent's threads; the parent keeps using the
    # sockets, so the child leaves them alone and listens afresh when it needs to.
    _boards.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
