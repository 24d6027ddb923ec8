"""Store options given through Celery's settings reach the store: the connection
pool (engine_options) for the broker and the result backend, on both dialects."""

from __future__ import annotations

from typing import Any

from celery import Celery
from harness import Broker

from celery_eventstore.backend import EventStoreBackend


def test_engine_options_size_the_pool_of_broker_and_backend(broker: Broker) -> None:
    options: dict[str, Any] = {
        **broker.transport_options(), "engine_options": {"pool_size": 3, "max_overflow": 1},
    }
    app = Celery("options", broker=broker.url, backend=broker.url)
    app.conf.broker_transport_options = options
    app.conf.result_backend_transport_options = options
    try:
        with app.connection_for_write() as conn:
            store = conn.default_channel.store
            assert (store.engine.pool.size(), store.engine.pool._max_overflow) == (3, 1)
        backend = app.backend
        assert isinstance(backend, EventStoreBackend)
        # Same URL and options: one engine for both, as documented.
        assert backend.store is store
    finally:
        app.pool.force_close_all()
        app.close()


def test_partitioned_log_reaches_the_store_of_broker_and_backend(postgresql_db) -> None:
    url, options = postgresql_db
    options = {**options, "partitioned_log": True}
    app = Celery("options", broker=f"eventstore+{url}", backend=f"eventstore+{url}")
    app.conf.broker_transport_options = options
    app.conf.result_backend_transport_options = options
    try:
        with app.connection_for_write() as conn:
            store = conn.default_channel.store
            assert store.partitioned  # the first user created the log, partitioned
        assert app.backend.store is store
    finally:
        app.pool.force_close_all()
        app.close()
