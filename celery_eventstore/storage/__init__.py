"""The storage layer: the only package that speaks SQL.

:class:`EventStore` is the one interface; :mod:`.dialects` holds what differs
between PostgreSQL and SQLite.
"""

from __future__ import annotations

from .records import ClaimedMessage, ClaimRef, NewMessage, Outcome, QueueStats, RecordedEvent
from .schema import SCHEMA_VERSION
from .store import EventStore, parse_url, redact

__all__ = [
    "SCHEMA_VERSION",
    "ClaimRef",
    "ClaimedMessage",
    "EventStore",
    "NewMessage",
    "Outcome",
    "QueueStats",
    "RecordedEvent",
    "parse_url",
    "redact",
]
