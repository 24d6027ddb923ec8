"""Atomic enqueue for Django.

``atomic(django.db.connection)`` (or ``connections[alias]``) joins the transaction
or savepoint Django has open on that connection: the store writes through Django's
own DB-API connection and never begins, commits, rolls back or reconfigures it.

With ``"celery_eventstore.contrib.django"`` in ``INSTALLED_APPS`` that happens
without ``atomic``: every publish inside a ``transaction.atomic()`` block on the
broker's database joins that block's transaction (:func:`find_atomic_block`).
Outside one, a publish commits on its own as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa

from ...enqueue import AtomicEnqueueError, Binding, DBAPIBinding
from ...storage import EventStore, describe_connection

__all__ = ["DjangoBinding", "find_atomic_block"]


class DjangoBinding(Binding):
    """A Django connection wrapper's transaction, joined through its DB-API connection."""

    def __init__(self, wrapper: Any) -> None:
        self.wrapper = wrapper

    @contextlib.contextmanager
    def joined(self, store: EventStore) -> Iterator[sa.Connection]:
        wrapper = self.wrapper
        if not wrapper.in_atomic_block and wrapper.get_autocommit():
            raise AtomicEnqueueError(
                f"atomic() has no open transaction to join on Django's {wrapper.alias!r} "
                "connection: publish inside transaction.atomic()"
            )
        if wrapper.needs_rollback:
            raise AtomicEnqueueError(
                f"atomic() cannot join the transaction of Django's {wrapper.alias!r} "
                "connection: it is marked for rollback (an error occurred inside the "
                "atomic block)"
            )
        wrapper.ensure_connection()
        with DBAPIBinding(lambda: wrapper.connection).joined(store) as conn:
            yield conn


def find_atomic_block(store: EventStore) -> DjangoBinding | None:
    """The Django connection of this thread that is inside ``transaction.atomic()``
    on the store's database, if any (the automatic mode)."""
    from django.db import connections

    for wrapper in connections.all(initialized_only=True):
        if not wrapper.in_atomic_block or wrapper.connection is None:
            continue
        info = describe_connection(wrapper.connection)
        if info is not None and store.same_database(info.url):
            return DjangoBinding(wrapper)
    return None
