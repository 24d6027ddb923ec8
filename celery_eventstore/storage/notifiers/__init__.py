"""Wake-ups: how committed work reaches waiting consumers and result waiters.

A notifier is chosen apart from the dialect, as a seam of its own:

* ``notify`` -- PostgreSQL ``LISTEN/NOTIFY``: writers send on commit, listeners
  wait on a socket an event loop can watch (:mod:`.postgresql_notify`);
* ``data_version`` -- SQLite change detection: a listener polls
  ``PRAGMA data_version`` and wakes when another connection committed
  (:mod:`.sqlite_data_version`); writers send nothing;
* ``poll`` -- nothing is sent and listeners never wake: consumers rely on their
  periodic poll (PgBouncer's transaction pooling, where LISTEN cannot work).

Every mechanism answers to the same :class:`Listener` interface, so the transport
and the result backend never know which one runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import sqlalchemy as sa

from ...exceptions import ConfigurationError

#: The payload a listener returns when it cannot tell which queue woke it.
ANY_QUEUE = "*"

NOTIFY = "notify"
DATA_VERSION = "data_version"
POLL = "poll"


class Listener:
    """Something a consumer waits on for "the store changed".

    :meth:`fileno` is a socket an event loop can watch (PostgreSQL LISTEN), or
    None when the listener can only be polled (then call :meth:`poll` on a timer).
    :meth:`poll` never blocks and returns the queues woken since the last call
    (``{ANY_QUEUE}`` when it cannot tell which); :meth:`wait` blocks up to ``timeout``.
    """

    def fileno(self) -> int | None:
        return None

    def poll(self) -> set[str]:
        raise NotImplementedError

    def wait(self, timeout: float) -> set[str]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the listener's connection."""


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

    def send(self, conn: sa.Connection, channel: str, payloads: Iterable[str]) -> None:
        """Wake listeners of ``channel`` when ``conn``'s transaction commits."""

    def listen(self, engine: sa.Engine, channels: Iterable[str]) -> Listener:
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
