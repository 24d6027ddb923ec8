"""The storage layer: the only package that speaks SQL.

Adapters (the transport, the result backend, the CLI, atomic enqueue) import from
here and nowhere deeper: :class:`EventStore` is the face, the values it takes and
returns are plain records, and the wake-up :class:`Listener` is the one object
that outlives a call.
"""

from __future__ import annotations

from .database import BROKER_PREFIX, parse_url, redact
from .log import fold as fold_stream
from .notifiers import ANY_QUEUE, Listener
from .records import (
    ClaimedMessage,
    ClaimRef,
    DeadLetter,
    LogFilter,
    NewMessage,
    Outcome,
    QueueStats,
    RecordedEvent,
    TaskFilter,
    TaskSummary,
)
from .routing import Binding, QueueInfo
from .schema import SCHEMA_VERSION
from .store import EventStore

__all__ = [
    "ANY_QUEUE",
    "BROKER_PREFIX",
    "SCHEMA_VERSION",
    "Binding",
    "ClaimRef",
    "ClaimedMessage",
    "DeadLetter",
    "EventStore",
    "LogFilter",
    "Listener",
    "NewMessage",
    "Outcome",
    "QueueInfo",
    "QueueStats",
    "RecordedEvent",
    "TaskFilter",
    "TaskSummary",
    "fold_stream",
    "parse_url",
    "redact",
]
