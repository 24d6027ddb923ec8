"""SQLite change detection by ``PRAGMA data_version``: no table is read to find out.

When does it look?  On Linux, when the kernel says the database file or its
write-ahead log was written (inotify on their directory): a commit by any process
wakes waiters at once, and an event loop can watch the descriptor.  Elsewhere,
or where inotify cannot be had, it polls the pragma on an interval.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from ...exceptions import DatabaseUnavailable
from . import ANY_QUEUE, DATA_VERSION, Listener, Notifier
from .postgresql_notify import readable


class DataVersionNotifier(Notifier):
    """Writers send nothing: every commit to the file already changes its data version."""

    name = DATA_VERSION

    def listen(self, engine: sa.Engine, channels: Iterable[str]) -> Listener:
        return DataVersionListener(engine)


logger = logging.getLogger(__name__)

# <sys/inotify.h>
_IN_MODIFY = 0x002
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_Q_OVERFLOW = 0x4000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
#: struct inotify_event without its name: wd, mask, cookie, len.
_EVENT = struct.Struct("iIII")


class FileWatch:
    """A descriptor that turns readable when a database file, its write-ahead log
    or its rollback journal is written, by any process (Linux inotify).

    The directory is watched, not the files: the log is deleted and made anew as
    connections come and go.  Raises OSError where inotify cannot be had.
    """

    def __init__(self, database: str) -> None:
        libc_name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(libc_name, use_errno=True)
        if not hasattr(libc, "inotify_init1"):
            raise OSError("inotify is not available here")
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        path = os.path.abspath(database)
        directory = os.path.dirname(path)
        if libc.inotify_add_watch(
            fd, os.fsencode(directory), _IN_MODIFY | _IN_CREATE | _IN_MOVED_TO
        ) < 0:
            errno = ctypes.get_errno()
            os.close(fd)
            raise OSError(errno, f"cannot watch {directory}")
        self.fd = fd
        base = os.fsencode(os.path.basename(path))
        self._names = {base, base + b"-wal", base + b"-journal"}
        #: Held while the descriptor is used and while it is closed: a number
        #: closed under a waiting thread may be reused at once by another open,
        #: whose data that thread would then read.
        self._lock = threading.Lock()

    def drain(self) -> bool:
        """Read the events waiting; whether any was about the database's files
        (False once closed)."""
        with self._lock:
            return self.fd >= 0 and self._drain()

    def _drain(self) -> bool:
        touched = False
        # Read only what poll() says is there: eventlet's os.read waits for a
        # descriptor with nothing to read instead of failing with EAGAIN.
        while readable(self.fd, 0):
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            offset = 0
            while offset + _EVENT.size <= len(data):
                _, mask, _, length = _EVENT.unpack_from(data, offset)
                start = offset + _EVENT.size
                name = data[start:start + length].rstrip(b"\0")
                offset = start + length
                if name in self._names or mask & _IN_Q_OVERFLOW:
                    touched = True
        return touched

    def wait(self, timeout: float) -> None:
        """Block until an event arrives or ``timeout`` passes (at once once
        closed).  A :meth:`close` meanwhile waits for it: keep ``timeout`` short."""
        with self._lock:
            if self.fd >= 0:
                readable(self.fd, max(timeout, 0.0))

    def close(self) -> None:
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def watch_file(engine: sa.Engine) -> FileWatch | None:
    """A :class:`FileWatch` on the engine's database file, or None (a memory
    database, or no inotify: the listener polls instead)."""
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    try:
        return FileWatch(database)
    except OSError as exc:
        logger.debug("no file watch on %s, polling instead: %s", database, exc)
        return None


#: After a file event with no change to see, how long (seconds) before the
#: pragma is read again: a commit's frames are written before it is visible.
COMMIT_IN_FLIGHT_PAUSE = 0.0002


class DataVersionListener(Listener):
    """Wakes when another connection committed to the database file.

    The pragma's value changes whenever another connection commits, so a consumer
    runs its claim query only after a write, not on every tick.  With a
    :class:`FileWatch`, the pragma is read when the file was written (and an event
    loop watches :meth:`fileno`); without one, waiting polls the pragma with an
    interval that starts short after activity and grows while the database stays
    quiet.
    """

    MIN_INTERVAL = 0.005
    MAX_INTERVAL = 0.1

    def __init__(self, engine: sa.Engine) -> None:
        self._conn: Any = engine.raw_connection()
        self._version = self._read()
        self._interval = self.MIN_INTERVAL
        self._watch = watch_file(engine)
        #: The last poll saw the file written but no commit yet.
        self._in_flight = False
        #: Held while the connection is used and while it is closed: a thread
        #: waiting on the listener must not use a connection another closed.
        self._lock = threading.Lock()
        self._closed = False

    def fileno(self) -> int | None:
        return None if self._watch is None else self._watch.fd

    def _read(self) -> int:
        try:
            cur = self._conn.cursor()
            try:
                cur.execute("PRAGMA data_version")
                return int(cur.fetchone()[0])
            finally:
                cur.close()
        except sqlite3.Error as exc:
            raise DatabaseUnavailable(f"lost the database file: {exc}") from exc

    def poll(self) -> set[str]:
        with self._lock:
            return set() if self._closed else self._poll()

    def _poll(self) -> set[str]:
        touched = self._watch is not None and self._watch.drain()
        version = self._read()
        # The pragma decides; the events only say when to look.  A commit writes
        # its log frames (the event) before it makes them visible, so an event
        # with no change yet may be a commit in flight: look again once, and
        # have a waiter look again soon rather than at the safety net.
        if touched and version == self._version:
            time.sleep(COMMIT_IN_FLIGHT_PAUSE)
            version = self._read()
        self._in_flight = touched and version == self._version
        if version == self._version:
            return set()
        self._version = version
        self._interval = self.MIN_INTERVAL
        return {ANY_QUEUE}

    def wait(self, timeout: float) -> set[str]:
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            woken = self.poll()
            remaining = deadline - time.monotonic()
            if woken or remaining <= 0:
                return woken
            if self._closed:  # by another thread: nothing will wake this one
                time.sleep(remaining)
                return set()
            watch = self._watch
            if watch is not None:
                # A safety net beside the events: the pragma is read at least
                # this often (a file system that sends no events, say).
                pause = self.MIN_INTERVAL if self._in_flight else self.MAX_INTERVAL
                watch.wait(min(pause, remaining))
                continue
            time.sleep(min(self._interval, remaining))
            self._interval = min(self._interval * 2, self.MAX_INTERVAL)

    def close(self) -> None:
        """Stop listening; safe while another thread waits (it then returns
        nothing at its timeout)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            watch, self._watch = self._watch, None
            self._conn.close()
        if watch is not None:
            watch.close()  # after a wait in flight on it: at most MAX_INTERVAL
