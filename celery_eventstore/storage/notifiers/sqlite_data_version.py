"""SQLite change detection by ``PRAGMA data_version``: no table is read to find out."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from ...exceptions import DatabaseUnavailable
from . import ANY_QUEUE, DATA_VERSION, Listener, Notifier


class DataVersionNotifier(Notifier):
    """Writers send nothing: every commit to the file already changes its data version."""

    name = DATA_VERSION

    def listen(self, engine: sa.Engine, channels: Iterable[str]) -> Listener:
        return DataVersionListener(engine)


class DataVersionListener(Listener):
    """Wakes when another connection committed to the database file.

    The pragma's value changes whenever another connection commits, so a consumer
    runs its claim query only after a write, not on every tick.  Waiting polls the
    pragma with an interval that starts short after activity and grows while the
    database stays quiet.
    """

    MIN_INTERVAL = 0.005
    MAX_INTERVAL = 0.1

    def __init__(self, engine: sa.Engine) -> None:
        self._conn: Any = engine.raw_connection()
        self._version = self._read()
        self._interval = self.MIN_INTERVAL

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
        version = self._read()
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
            time.sleep(min(self._interval, remaining))
            self._interval = min(self._interval * 2, self.MAX_INTERVAL)

    def close(self) -> None:
        self._conn.close()
