"""``celery inspect scheduled`` for ETA tasks the store holds.

A Celery worker lists as *scheduled* the ETA tasks it keeps in memory.  On this
broker it keeps none: the store holds a task until its ETA and only then lets a
worker claim it.  So the worker's ``scheduled`` answer is extended with the
messages the store holds for the queues that worker consumes, each described as
Celery describes a request of its own (``eta``, ``priority``, ``request``), so
``celery inspect scheduled``, Flower and ``app.control.inspect().scheduled()`` see
them.  Several workers consuming one queue each list its held messages: any of
them may run it.  ``inspect reserved`` needs nothing extra: a message claimed and
not started is a reserved request of the worker that claimed it.

Importing this module (the transport does) registers the command.
"""

from __future__ import annotations

import base64
from typing import Any

from celery.worker import control
from celery.worker.request import Request
from kombu import Message
from kombu.serialization import prepare_accept_content

from .storage import EventStore, ScheduledMessage

#: Celery's own answer, listed first.
_celery_scheduled = control.Panel.data["scheduled"]
#: The priority Celery's worker gives an ETA task on its timer, which it reports.
ETA_TIMER_PRIORITY = 6
#: Most held messages one answer lists.
LIMIT = 1000


@control.inspect_command(alias="dump_schedule")
def scheduled(state: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """List of currently scheduled ETA/countdown tasks."""
    own: list[dict[str, Any]] = _celery_scheduled(state, **kwargs)
    return own + held_for(state)


def held_for(state: Any) -> list[dict[str, Any]]:
    """The ETA tasks the store holds for the queues ``state``'s worker consumes."""
    consumer = state.consumer
    transport = getattr(getattr(consumer, "connection", None), "transport", None)
    store = getattr(transport, "store", None)
    task_consumer = getattr(consumer, "task_consumer", None)
    if not isinstance(store, EventStore) or task_consumer is None:
        return []  # another broker: Celery's answer is the whole answer
    queues = [queue.name for queue in task_consumer.queues]
    entries = (_entry(state, held) for held in store.scheduled(queues, LIMIT))
    return [entry for entry in entries if entry is not None]


def _entry(state: Any, held: ScheduledMessage) -> dict[str, Any] | None:
    """``held`` as Celery's worker lists a scheduled request; None for a message
    that is not a task this worker knows."""
    payload = held.message
    headers = dict(payload.get("headers") or {})
    properties = dict(payload.get("properties") or {})
    task = state.app.tasks.get(headers.get("task"))
    if task is None or "id" not in headers:
        return None
    body = payload.get("body")
    if properties.get("body_encoding") == "base64" and isinstance(body, str):
        body = base64.b64decode(body)
    message = Message(
        body=body,
        content_type=payload.get("content-type"),
        content_encoding=payload.get("content-encoding"),
        headers=headers,
        properties=properties,
        delivery_info={**(properties.get("delivery_info") or {}), "redelivered": False},
        accept=prepare_accept_content(state.app.conf.accept_content),
    )
    try:
        request = Request(message, app=state.app, hostname=state.hostname, task=task)
        info = request.info()
    except Exception:  # noqa: BLE001 - an undecodable body is not listed
        return None
    return {
        "eta": request.eta.isoformat() if request.eta else None,
        "priority": ETA_TIMER_PRIORITY,
        "request": info,
    }
