"""The Django app that turns on automatic atomic enqueue (add it to INSTALLED_APPS)."""

from __future__ import annotations

from django.apps import AppConfig


class AtomicEnqueueConfig(AppConfig):
    name = "celery_eventstore.contrib.django"
    label = "celery_eventstore"
    verbose_name = "Celery event store"

    def ready(self) -> None:
        from ...enqueue import join_automatically
        from . import find_atomic_block

        join_automatically(find_atomic_block)
