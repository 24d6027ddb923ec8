"""One store per database and options in each process, shared by its connections.

Celery opens several broker connections per process (consumer, producer pool,
event dispatcher); they share one engine and its connection pool.  A forked
child (a prefork pool process) drops the connections it inherited instead of
using sockets its parent is using too.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

from .storage import EventStore, parse_url

_stores: dict[tuple[str, tuple[tuple[str, Any], ...]], EventStore] = {}
_lock = threading.Lock()

#: Defaults for stores opened by the transport and the result backend: a newcomer's
#: first worker creates the schema (under a lock on PostgreSQL).  Set
#: ``auto_migrate`` to False where a DBA runs ``celery-eventstore migrate``.
ADAPTER_DEFAULTS: dict[str, Any] = {"auto_migrate": True}


def shared_store(url: str, options: Mapping[str, Any] | None = None) -> EventStore:
    merged = {**ADAPTER_DEFAULTS, **(options or {})}
    # The broker's and the result backend's URLs differ in their eventstore+
    # prefix at most: they share one store.
    url = parse_url(url).render_as_string(hide_password=False)
    key = (url, tuple(sorted((k, _frozen(v)) for k, v in merged.items())))
    with _lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = EventStore(url, **merged)
        return store


def _frozen(value: Any) -> Any:
    """A hashable stand-in for an option value (``engine_options`` is a dict)."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _after_fork_in_child() -> None:
    for store in _stores.values():
        store.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
