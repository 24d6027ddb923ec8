"""A publish whose commit landed but whose answer was lost, retried by its producer.

Celery publishes with kombu's retries on (``task_publish_retry``): a connection
error during a publish makes kombu connect again and publish the same message
once more.  When the error came after the server committed, that retry must not
become a second delivery -- a task that runs twice.  :class:`cutter.CommitCutter`
loses exactly one such answer.
"""

from __future__ import annotations

from typing import Any

import kombu
import proj
import pytest
from cutter import commit_cutter
from harness import Broker
from pgserver import EmbeddedPostgres

from celery_eventstore import lifecycle as lc


def _deliveries(broker: Broker, stream: str) -> list[str]:
    return [r.event.delivery for r in broker.events(stream) if isinstance(r.event, lc.Published)]


@pytest.mark.parametrize("broker", ["postgresql"], indirect=True)
def test_a_task_published_again_after_its_commit_landed_is_one_delivery(
    broker: Broker, pg_server: EmbeddedPostgres
) -> None:
    with commit_cutter(pg_server.port) as cutter:
        app = proj.make_app(f"eventstore+{cutter.url()}", broker.transport_options())
        try:
            task = app.tasks["proj.plain"]
            task.delay(sleep=0)  # connects and declares before the fault
            cutter.arm()
            result = task.delay(sleep=0)
        finally:
            app.pool.force_close_all()
            app.close()
    assert cutter.cuts == 1, "no commit's answer was lost"
    assert len(_deliveries(broker, result.id)) == 1, broker.types(result.id)
    assert broker.stats().ready == 2


@pytest.mark.parametrize("exchange_type", ["direct", "fanout"])
@pytest.mark.parametrize("broker", ["postgresql"], indirect=True)
def test_a_plain_message_published_again_after_its_commit_landed_is_one_delivery(
    broker: Broker, pg_server: EmbeddedPostgres, exchange_type: str
) -> None:
    """A message without a task id is a stream of its own, named by its delivery;
    a fanout to two queues is a delivery in each."""
    exchange = kombu.Exchange("indoubt", type=exchange_type)
    queues = [kombu.Queue(f"indoubt-{n}", exchange, routing_key="k") for n in (1, 2)]
    with commit_cutter(pg_server.port) as cutter:
        with kombu.Connection(
            f"eventstore+{cutter.url()}", transport_options=broker.transport_options()
        ) as connection:
            producer = connection.Producer(exchange=exchange, routing_key="k")
            publish: Any = producer.publish
            publish({"n": 0}, declare=list(queues), retry=True)
            cutter.arm()
            publish({"n": 1}, retry=True, retry_policy={"max_retries": 3})
    assert cutter.cuts == 1, "no commit's answer was lost"
    sizes = {q.name: broker.store.queue_size(q.name) for q in queues}
    # Both queues are bound with the routing key: a direct exchange routes to both too.
    assert sizes == {"indoubt-1": 2, "indoubt-2": 2}
