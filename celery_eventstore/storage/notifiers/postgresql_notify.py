"""PostgreSQL ``LISTEN/NOTIFY`` wake-ups; works with psycopg2 and psycopg 3."""

from __future__ import annotations

import contextlib
import select
from collections.abc import Iterable, Iterator
from typing import Any

import sqlalchemy as sa

from ...exceptions import DatabaseUnavailable
from . import NOTIFY, Listener, Notifier


class PostgreSQLNotifier(Notifier):
    name = NOTIFY

    def send(self, conn: sa.Connection, channel: str, payloads: Iterable[str]) -> None:
        # pg_notify is transactional: listeners hear it only if we commit.
        for payload in sorted(set(payloads)):
            conn.execute(sa.select(sa.func.pg_notify(channel, payload)))

    def listen(self, engine: sa.Engine, channels: Iterable[str]) -> Listener:
        return NotifyListener(engine, channels)


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


def readable(fd: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``fd`` to be readable.  poll() where
    there is one: select() fails for descriptors past FD_SETSIZE (1024), which a
    busy worker process can reach."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(max(timeout, 0.0) * 1000))
    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready)


class NotifyListener(Listener):
    """A dedicated autocommit connection that LISTENs on the store's channels.

    It is its own DBAPI connection, outside the pool: a pooled connection would
    be handed to other work and lose its LISTEN.
    """

    def __init__(self, engine: sa.Engine, channels: Iterable[str]) -> None:
        args, kwargs = engine.dialect.create_connect_args(engine.url)
        with _lost_on_error():
            self._conn: Any = engine.dialect.connect(*args, **kwargs)
        self._psycopg2 = engine.dialect.driver == "psycopg2"
        if self._psycopg2:
            self._conn.set_isolation_level(0)
        else:
            self._conn.autocommit = True
        for channel in channels:
            quoted = '"' + channel.replace('"', '""') + '"'
            if self._psycopg2:
                with contextlib.closing(self._conn.cursor()) as cur:
                    cur.execute(f"LISTEN {quoted}")
            else:
                self._conn.execute(f"LISTEN {quoted}")

    def fileno(self) -> int:
        return int(self._conn.fileno())

    def poll(self) -> set[str]:
        with _lost_on_error():
            if self._psycopg2:
                self._conn.poll()
                payloads = {n.payload for n in self._conn.notifies}
                self._conn.notifies.clear()
                return payloads
            return {n.payload for n in self._conn.notifies(timeout=0)}

    def wait(self, timeout: float) -> set[str]:
        woken = self.poll()
        if woken or timeout <= 0:
            return woken
        with _lost_on_error():
            ready = readable(self.fileno(), timeout)
        return self.poll() if ready else set()

    def close(self) -> None:
        try:
            self._conn.close()
        except Exception:  # noqa: BLE001 - closing a dead connection is not an error
            pass
