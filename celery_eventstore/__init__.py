"""An event store as Celery's broker and result backend (PostgreSQL, SQLite)."""

from __future__ import annotations

from typing import Any

from . import _register  # noqa: F401 - the eventstore+ broker URL alias

__version__ = "0.1.0"
__all__ = ["atomic", "__version__"]


def __getattr__(name: str) -> Any:
    # Kept lazy: kombu imports this package in every process to register the alias.
    if name == "atomic":
        from .enqueue import atomic

        return atomic
    raise AttributeError(name)
