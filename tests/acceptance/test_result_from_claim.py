"""A worker's result decided on the state its claim left.

The transport hands the task stream's state, as the claim left it, to the
result backend in a message property; Celery carries it to the pool process on
the request.  The backend decides the claim's first result on it and appends it
with no read of the stream -- only where that state is of the backend's own
store.  Here the request is made from a delivered message as Celery's worker
makes it (its headers and properties), on a real PostgreSQL, with no worker."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import kombu
import pytest
import sqlalchemy as sa
from celery import Celery
from celery.app.task import Context

from celery_eventstore import backend
from celery_eventstore import lifecycle as lc

Database = tuple[str, dict[str, Any]]


def make_app(url: str, broker_options: dict[str, Any], backend_options: dict[str, Any]) -> Celery:
    app = Celery("claimstate", broker=f"eventstore+{url}", backend=f"eventstore+{url}")
    app.conf.broker_transport_options = broker_options
    app.conf.result_backend_transport_options = backend_options
    app.conf.task_default_queue = "celery"
    return app


@pytest.fixture
def app(postgresql_db: Database) -> Iterator[Celery]:
    url, options = postgresql_db
    app = make_app(url, options, options)
    yield app
    app.close()


def delivered(app: Celery, conn: kombu.Connection) -> tuple[kombu.Message, Context]:
    """Publish a task and take it as a worker would, on ``conn`` (which holds
    the claim until it closes): the message, and the request Celery's worker
    makes of it (its headers and its properties)."""
    task_id = uuid.uuid4().hex
    app.send_task("claimstate.noop", task_id=task_id)
    message = kombu.Queue("celery")(conn.channel()).get()
    assert message is not None and message.headers["id"] == task_id
    return message, Context({**message.headers, "properties": message.properties})


def reads_of(app: Celery, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The streams whose events the result backend's store decodes from now on."""
    log = app.backend.store.log
    decoded: list[str] = []
    recorded = log.recorded
    monkeypatch.setattr(log, "recorded", lambda row: decoded.append(row.stream_id) or recorded(row))
    return decoded


@pytest.mark.parametrize("acked", [False, True], ids=["late-ack", "early-ack"])
def test_a_result_is_written_without_reading_its_stream(
    app: Celery, monkeypatch: pytest.MonkeyPatch, acked: bool
) -> None:
    """``early-ack``: acked before the task runs, Celery's default, and the ack
    written before the result (the task outlasted ``ack_flush_interval``)."""
    with app.connection() as conn:
        message, request = delivered(app, conn)
        task_id = request.id
        if acked:
            message.ack()
            message.channel.qos.flush_acks()
        reads = reads_of(app, monkeypatch)
        app.backend.mark_as_done(task_id, {"answer": 42}, request=request)
        assert reads == []  # (closing the connection gives a held claim back: a read)
    assert request.properties[backend.CLAIM_STATE][1].stream == task_id
    expected = ["Published", "Claimed", *(["Acked"] if acked else []), "Succeeded"]
    types = [e.type for e in app.backend.store.read_stream(task_id)]
    assert types[:len(expected)] == expected
    assert app.AsyncResult(task_id).get(timeout=5) == {"answer": 42}


def test_a_second_write_under_the_claim_reads(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the claim's first write (STARTED, with ``task_track_started``) the
    claim's state is behind the stream: the backend no longer offers it (a
    write decided on it would only lose on the version key), and the next
    write reads."""
    store = app.backend.store
    offered: list[Any] = []
    execute = store.execute
    monkeypatch.setattr(store, "execute", lambda stream, command, **kw: (
        offered.append(kw.get("known")) or execute(stream, command, **kw)))
    with app.connection() as conn:
        _, request = delivered(app, conn)
        task_id = request.id
        app.backend.store_result(task_id, None, "STARTED", request=request)
        reads = reads_of(app, monkeypatch)
        app.backend.mark_as_failure(task_id, ValueError("no"), request=request)
        assert task_id in reads
    assert [type(known) for known in offered[:2]] == [lc.TaskState, type(None)]
    types = [e.type for e in app.backend.store.read_stream(task_id)]
    assert types[:4] == ["Published", "Claimed", "Started", "Failed"]


def test_a_claims_state_from_another_store_is_not_used(postgresql_db: Database) -> None:
    """Broker and result backend in two schemas of one database: the claim's
    state is the broker's stream, not the backend's, which holds no events of
    the task -- the result is the first event there, as from any broker."""
    url, broker_options = postgresql_db
    results_schema = f"r_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.schema.CreateSchema(results_schema))
    app = make_app(url, broker_options, {"schema": results_schema})
    try:
        with app.connection() as conn:
            _, request = delivered(app, conn)
            task_id = request.id
            app.backend.mark_as_done(task_id, "done", request=request)
        [only] = app.backend.store.read_stream(task_id)
        assert (only.type, only.version) == ("Succeeded", 1)
        assert app.AsyncResult(task_id).get(timeout=5) == "done"
    finally:
        app.close()
        with engine.begin() as conn:
            conn.execute(sa.schema.DropSchema(results_schema, cascade=True))
        engine.dispose()
