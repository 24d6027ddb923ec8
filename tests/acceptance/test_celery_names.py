"""A Celery producer gets the store's one clear error for a name it cannot keep.

No worker: the error is raised by the publish, in the producer.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from harness import Broker

from celery_eventstore.exceptions import InvalidName


def _untouched(broker: Broker) -> None:
    assert broker.store.last_position() == 0
    assert broker.store.queue_stats() == []


def test_send_task_with_an_overlong_task_id_raises_invalid_name(broker: Broker) -> None:
    started = time.monotonic()
    with pytest.raises(InvalidName, match="the limit is 255") as info:
        broker.app.send_task("proj.plain", task_id="x" * 300)
    # Not a connection error: Celery's publish retry does not spin on it.
    assert time.monotonic() - started < 5
    assert "task id 'xxxx" in str(info.value) and "300 characters" in str(info.value)
    with broker.app.connection_for_write() as conn:
        transport = conn.transport
        assert not issubclass(
            InvalidName, (*transport.connection_errors, *transport.channel_errors)
        )
    _untouched(broker)


def test_apply_async_with_a_nul_in_the_task_id_raises_invalid_name(
    broker: Broker, result_app: Any
) -> None:
    add = result_app.tasks["resultproj.add"]
    with pytest.raises(InvalidName, match="NUL character"):
        add.apply_async((1, 2), task_id="bad\x00id")
    _untouched(broker)


def test_send_task_to_an_overlong_queue_raises_invalid_name(broker: Broker) -> None:
    with pytest.raises(InvalidName, match="queue name 'qqq.*the limit is 255"):
        broker.app.send_task("proj.plain", queue="q" * 300)
    _untouched(broker)
