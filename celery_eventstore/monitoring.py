"""Celery task events for what the store decides itself, so monitors see it.

A worker tells ``celery events`` and Flower what becomes of each task it handles
(``task-revoked``, ``task-failed``...).  Some verdicts are the store's, and no
worker ever sees the task: a revoke while the task waits in the store, an expiry
found by a claim, a queue purge, a dead letter after the claim budget is spent, a
quarantine.  For those the store sends the event the worker would have sent, on
the same event exchange, once the verdict has committed:

=========================================  ==========================================
the store records                          Celery event
=========================================  ==========================================
``Revoked`` (CLI, control broadcast)       ``task-revoked`` (``expired=False``)
``Discarded`` reason ``revoked``           ``task-revoked`` (a message of a revoked task)
``Discarded`` reason ``expired``           ``task-revoked`` (``expired=True``)
``Discarded`` by a purge                   ``task-rejected`` (``requeue=False``)
``DeadLettered`` (claim budget spent)      ``task-failed`` (``TaskDeadLettered``)
``Quarantined``                            ``task-failed`` (``TaskDeadLettered``)
=========================================  ==========================================

Verdicts a worker reports itself (its own reject, a result it records) are left
to it.  The events come from the hostname ``eventstore@<host>`` and travel like
every Celery event: transient messages, dropped when no monitor is listening.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from celery.events import Event
from celery.utils.time import utcoffset
from kombu import Connection, Exchange, Producer

from . import lifecycle as lc
from .storage import BROKER_PREFIX, EventStore, RecordedEvent

logger = logging.getLogger(__name__)

#: Celery's default ``event_exchange``.
EVENT_EXCHANGE = "celeryev"
#: Who the events say they come from.
HOSTNAME = f"eventstore@{socket.gethostname()}"
#: Reasons of dead letters a worker decided (it sends its own event).
WORKER_REASONS = ("rejected by the consumer",)
#: Why a purge discards a message (``EventStore.purge``'s default reason).
PURGED = "purged"


def celery_events(recorded: Iterable[RecordedEvent]) -> list[dict[str, Any]]:
    """The Celery task events a batch of committed store events calls for."""
    events: list[dict[str, Any]] = []
    revoked: set[str] = set()
    for rec in recorded:
        fields = _fields(rec.event)
        if fields is None:
            continue
        kind, extra = fields
        if kind == "task-revoked":
            if rec.stream in revoked:
                continue  # one revoke, whatever it discarded
            revoked.add(rec.stream)
        events.append(Event(kind, uuid=rec.stream, hostname=HOSTNAME, pid=os.getpid(),
                            clock=0, utcoffset=utcoffset(), **extra))
    return events


def _fields(event: lc.Event) -> tuple[str, dict[str, Any]] | None:
    if isinstance(event, lc.Revoked) and event.result is None:  # not a worker's
        return "task-revoked", {"terminated": False, "signum": None, "expired": False}
    if isinstance(event, lc.Discarded):
        if event.reason in ("revoked", "expired"):
            expired = event.reason == "expired"
            return "task-revoked", {"terminated": False, "signum": None, "expired": expired}
        if event.reason == PURGED:
            return "task-rejected", {"requeue": False}
        return None
    if isinstance(event, (lc.DeadLettered, lc.Quarantined)):
        if event.reason in WORKER_REASONS:
            return None
        return "task-failed", {
            "exception": f"TaskDeadLettered({event.reason!r})", "traceback": None,
        }
    return None


class Announcer:
    """Publishes the events of one store's verdicts on its event exchange."""

    def __init__(self, store: EventStore, transport_options: Mapping[str, Any],
                 exchange: str = EVENT_EXCHANGE) -> None:
        self.url = BROKER_PREFIX + store.url.render_as_string(hide_password=False)
        self.transport_options = dict(transport_options)
        self.exchange = Exchange(exchange, type="topic")
        self._lock = threading.Lock()

    def __call__(self, recorded: list[RecordedEvent]) -> None:
        events = celery_events(recorded)
        if not events:
            return
        with self._lock, Connection(self.url, transport_options=self.transport_options) as conn:
            producer = Producer(conn)
            for event in events:
                producer.publish(
                    event, exchange=self.exchange, routing_key=event["type"].replace("-", "."),
                    serializer="json", headers={"hostname": HOSTNAME}, delivery_mode=1,
                    declare=[self.exchange],
                )


def announce(store: EventStore, transport_options: Mapping[str, Any] | None = None) -> None:
    """Send Celery task events for ``store``'s own verdicts from now on (once per
    store, however many connections share it)."""
    if getattr(store, "_announcer", None) is None:
        announcer = Announcer(store, transport_options or {})
        store._announcer = announcer  # type: ignore[attr-defined]
        store.watch(announcer)
