"""An event store as Celery's broker and result backend (PostgreSQL, SQLite)."""

from __future__ import annotations

__version__ = "0.1.0"
