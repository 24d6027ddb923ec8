"""The storage layer: the only package that speaks SQL.

Adapters (the transport, the result backend, the CLI, atomic enqueue) import from
here and nowhere deeper: :class:`EventStore` is the face, the values it takes and
returns are plain records, and the wake-up :class:`Listener` is the one object
that outlives a call.
"""

from __future__ import annotations

from .borrowed import ABORTED, NONE, OPEN, ConnectionInfo
from .database import BROKER_PREFIX, parse_url, redact
from .dialects import describe_connection
from .log import fold as fold_stream
from .notifiers import ANY_QUEUE, Listener
from .records import (
    ClaimedMessage,
    ClaimRef,
    ClaimRound,
    DeadLetter,
    LogFilter,
    NewMessage,
    Outcome,
    QueueStats,
    RecordedEvent,
    ScheduledMessage,
    TaskFilter,
    TaskSummary,
)
from .routing import Binding, QueueInfo
from .schema import SCHEMA_VERSION
from .store import EventStore

__all__ = [
    "ABORTED",
    "ANY_QUEUE",
    "BROKER_PREFIX",
    "SCHEMA_VERSION",
    "Binding",
    "ClaimRef",
    "ClaimedMessage",
    "ClaimRound",
    "ConnectionInfo",
    "DeadLetter",
    "EventStore",
    "LogFilter",
    "Listener",
    "NONE",
    "NewMessage",
    "OPEN",
    "Outcome",
    "QueueInfo",
    "QueueStats",
    "RecordedEvent",
    "ScheduledMessage",
    "describe_connection",
    "TaskFilter",
    "TaskSummary",
    "fold_stream",
    "parse_url",
    "redact",
]
