"""The event store as Celery's result backend, with a real prefork worker whose
broker *and* result backend it is (``celery -A resultproj``), on SQLite and on
PostgreSQL: states, failures, retries, custom states, groups, native chords,
forget and expiry (invariant 8: results are events).

One worker per dialect serves every test of the module but the expiry test
(which needs the worker stopped): starting prefork workers is the slow part.
Tests never share a task id.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import proj
import pytest
import resultproj
import sqlalchemy as sa
from celery import chord, group
from celery.exceptions import ChordError, TaskRevokedError
from celery.result import AsyncResult, GroupResult, ResultSet
from harness import LOG_TAIL_LINES, Broker, Worker, _failed, make_broker, reaper_for, wait_for

from celery_eventstore import lifecycle as lc

TIMEOUT = 30.0


@dataclass
class Results:
    broker: Broker
    worker: Worker
    app: Any

    def types(self, stream: str) -> list[str]:
        return self.broker.types(stream)

    def meta(self, task_id: str) -> dict[str, Any]:
        """The stored meta, read from the store (no cache)."""
        meta: dict[str, Any] = self.app.backend.get_task_meta(task_id, cache=False)
        return meta

    def task(self, name: str) -> Any:
        return self.app.tasks[f"resultproj.{name}"]


def _close_listener(app: Any) -> None:
    """Close the result waiter's LISTEN connection of ``app``'s backend, if any."""
    backend = getattr(app._local, "backend", None)
    listener = getattr(getattr(backend, "_local", None), "listener", None)
    if listener is not None:
        listener.close()


def _close_app(app: Any) -> None:
    _close_listener(app)
    app.pool.force_close_all()
    app.close()


@pytest.fixture(scope="module", params=["sqlite", "postgresql", "postgresql-unprepared"])
def results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Results]:
    """A broker, one ``resultproj`` worker on it, and the test process's app.
    ``postgresql`` (psycopg2) prepares statements on the server after five runs,
    ``postgresql-unprepared`` never."""
    dialect = "sqlite" if request.param == "sqlite" else "postgresql"
    reaper = reaper_for(request, dialect)
    tmp_path = tmp_path_factory.mktemp(f"results-{request.param}")
    if dialect == "sqlite":
        url = f"sqlite:///{tmp_path / 'broker.db'}"
    else:
        url = request.getfixturevalue("postgresql_url")
        if request.param == "postgresql-unprepared":
            url = sa.make_url(url).set(drivername="postgresql+psycopg2").update_query_dict(
                {"prepare_threshold": "none"}).render_as_string(hide_password=False)
    broker, cleanup = make_broker(url, tmp_path, prefix="accr")

    app = None
    try:
        worker = Worker(broker, f"r-{uuid.uuid4().hex[:6]}", [], app="resultproj")
        broker.workers.append(worker)
        worker.wait_ready()
        app = resultproj.make_app(broker.url, broker.transport_options())
        yield Results(broker, worker, app)
    except BaseException:
        for w in broker.workers:
            print(f"\n----- log of worker {w.name} -----\n{w.tail()}")
        raise
    finally:
        if app is not None:
            _close_app(app)
        for w in broker.workers:
            w.terminate()
        reaper.submit(cleanup)


@pytest.fixture
def second_app(results: Results) -> Iterator[Any]:
    """Another app on the same store: reads that no cache of ``results.app`` answers."""
    app = resultproj.make_app(results.broker.url, results.broker.transport_options())
    yield app
    # Not app.close(): kombu shares one producer pool between apps with the same
    # broker URL, and closing it here would close ``results.app``'s.
    _close_listener(app)


@pytest.fixture(autouse=True)
def _worker_log_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "results" in request.fixturenames and _failed(request):
        worker = request.getfixturevalue("results").worker
        print(f"\n----- log of worker {worker.name} (last {LOG_TAIL_LINES} lines) -----")
        print(worker.tail())


def _all_events(broker: Broker) -> list[Any]:
    out: list[Any] = []
    after = 0
    while True:
        page = broker.store.read_all(after=after, limit=1000)
        if not page:
            return out
        out.extend(page)
        after = page[-1].position


# -- 1. success, with result_extended ---------------------------------------------


def test_success_state_history_and_extended_result(results: Results) -> None:
    r = results.task("add").apply_async(args=(2,), kwargs={"y": 3})
    assert r.get(timeout=TIMEOUT) == 5
    assert r.state == "SUCCESS"

    fresh = results.app.AsyncResult(r.id)
    assert fresh.state == "SUCCESS"
    assert fresh.result == 5
    assert fresh.name == "resultproj.add"
    assert list(fresh.args) == [2]
    assert fresh.kwargs == {"y": 3}
    assert fresh.worker is not None and fresh.worker.startswith(f"{results.worker.name}@")
    assert fresh.queue == "celery"
    assert fresh.date_done is not None

    types = results.broker.wait_for_event(r.id, "Acked")
    # Acked (early ack) and Started may land in either order.
    assert sorted(types) == sorted(["Published", "Claimed", "Acked", "Started", "Succeeded"])
    assert types[:2] == ["Published", "Claimed"]
    assert types.index("Started") < types.index("Succeeded")
    started = next(e.event for e in results.broker.events(r.id) if e.type == "Started")
    assert started.worker is not None and started.worker.startswith(f"{results.worker.name}@")


# -- 2. failure ---------------------------------------------------------------------


def test_failure_is_the_exception_with_its_traceback(results: Results) -> None:
    r = results.task("boom").delay(7)
    exc = r.get(propagate=False, timeout=TIMEOUT)
    assert isinstance(exc, ValueError), repr(exc)
    assert str(exc) == "boom 7"
    assert r.state == "FAILURE"
    assert r.traceback and "ValueError: boom 7" in r.traceback

    events = results.broker.events(r.id)
    failed = [e.event for e in events if isinstance(e.event, lc.Failed)]
    assert len(failed) == 1, [e.type for e in events]
    assert "ValueError" in failed[0].exc and "boom 7" in failed[0].exc
    assert failed[0].traceback and "ValueError" in failed[0].traceback
    assert "Succeeded" not in [e.type for e in events]


# -- 3. retries -----------------------------------------------------------------------


def test_retries_then_success(results: Results) -> None:
    r = results.task("retrying").delay(2)
    assert r.get(timeout=TIMEOUT) == 2
    assert r.state == "SUCCESS"
    types = results.types(r.id)
    assert types.count("RetryScheduled") == 2, types
    assert types.count("Published") == 3, types
    assert types.count("Succeeded") == 1, types
    assert types.index("Succeeded") > max(i for i, t in enumerate(types) if t == "RetryScheduled")


# -- 4. SUCCESS is final --------------------------------------------------------------


def test_a_state_written_after_success_does_not_overwrite_it(
    results: Results, second_app: Any
) -> None:
    r = results.task("add").delay(20, 22)
    assert r.get(timeout=TIMEOUT) == 42
    before = results.broker.wait_for_event(r.id, "Acked")

    results.app.backend.store_result(r.id, ValueError("too late"), "FAILURE")
    results.app.backend.store_result(r.id, {"step": 9}, "PROGRESS")

    meta = results.meta(r.id)
    assert (meta["status"], meta["result"]) == ("SUCCESS", 42)
    assert second_app.AsyncResult(r.id).state == "SUCCESS"
    assert results.types(r.id) == before  # nothing was appended


# -- 5. custom states -------------------------------------------------------------------


def test_update_state_is_visible_while_the_task_runs(results: Results) -> None:
    r = results.task("progress").delay()
    wait_for(
        lambda: results.app.AsyncResult(r.id).state == "PROGRESS",
        TIMEOUT,
        f"{r.id} to report PROGRESS",
        show=lambda: (results.meta(r.id), results.types(r.id)),
    )
    assert results.app.AsyncResult(r.id).info == {"step": 1, "of": 2}
    assert "Succeeded" not in results.types(r.id)

    (results.broker.markers / proj.go_file(r.id)).touch()
    assert r.get(timeout=TIMEOUT) == "done"
    assert results.app.AsyncResult(r.id).state == "SUCCESS"
    assert "StateUpdated" in results.types(r.id)


# -- 6. groups ------------------------------------------------------------------------


def test_groups_save_restore_delete_and_native_join(results: Results, second_app: Any) -> None:
    add = results.task("add")
    expected = [0, 2, 4, 6, 8]
    gr = group(add.s(i, i) for i in range(5))()
    assert gr.get(timeout=TIMEOUT) == expected
    ids = [c.id for c in gr.results]

    gr.save()
    assert "GroupSaved" in results.types(f"group:{gr.id}")
    restored = results.app.GroupResult.restore(gr.id)
    assert restored is not None
    assert [c.id for c in restored.results] == ids
    # Restored without the backend's cache: through a second app.
    other = second_app
    restored2 = GroupResult.restore(gr.id, app=other)
    assert restored2 is not None and [c.id for c in restored2.results] == ids
    assert restored2.join_native(timeout=TIMEOUT) == expected

    gr.delete()
    assert results.types(f"group:{gr.id}")[-1] == "GroupDeleted"
    assert GroupResult.restore(gr.id, app=other) is None

    rs = ResultSet([AsyncResult(i, app=other) for i in ids], app=other)
    assert rs.join_native(timeout=TIMEOUT) == expected

    many = dict(other.backend.get_many(ids, timeout=TIMEOUT))
    assert set(many) == set(ids)
    assert [many[i]["status"] for i in ids] == ["SUCCESS"] * 5
    assert [many[i]["result"] for i in ids] == expected


# -- 7. native chords -------------------------------------------------------------------


def _published_task_names(broker: Broker) -> list[str]:
    return [
        (r.metadata or {}).get("task", "")
        for r in _all_events(broker)
        if isinstance(r.event, lc.Published)
    ]


def test_native_chord_fires_its_callback_once_without_chord_unlock(results: Results) -> None:
    add, tsum = results.task("add"), results.task("tsum")
    header = [add.s(i, i) for i in range(4)]
    r = chord(header)(tsum.s())
    assert r.get(timeout=TIMEOUT) == 12
    gid = r.parent.id
    header_ids = {c.id for c in r.parent.results}

    names = _published_task_names(results.broker)
    assert "celery.chord_unlock" not in names
    assert names.count("resultproj.tsum") >= 1

    events = results.broker.events(f"chord:{gid}")
    parts = [e.event for e in events if isinstance(e.event, lc.ChordPartDone)]
    assert sorted(p.task_id for p in parts) == sorted(header_ids)
    assert all(p.state == "SUCCESS" for p in parts)
    assert [e.type for e in events].count("ChordCompleted") == 1
    # The callback ran exactly once (one delivery of one stream).
    assert results.types(r.id).count("Published") == 1
    assert results.types(r.id).count("Succeeded") == 1


def test_a_chord_counts_each_task_of_a_group_nested_in_its_header(results: Results) -> None:
    # The header's second part is a chain ending in a group: both tasks of that group
    # report to the chord, so it has three parts, not the two results of its header.
    add = results.task("add")
    header = [add.si(1, 100), add.si(1, 200) | group(add.si(1, 1000), add.si(1, 2000))]
    r = chord(header)(add.si(1, 10))
    assert r.get(timeout=TIMEOUT) == 11

    leaves = [r.parent.results[0].id, *(c.id for c in r.parent.results[1].results)]
    events = results.broker.events(f"chord:{r.parent.id}")
    assert [e.type for e in events] == ["ChordPartDone"] * 3 + ["ChordCompleted"]
    assert sorted(e.event.task_id for e in events[:3]) == sorted(leaves)


@pytest.mark.slow
def test_a_chord_of_hundreds_of_parts_fires_its_callback_once(results: Results) -> None:
    add, tsum = results.task("add"), results.task("tsum")
    size = 300
    r = chord([add.s(i, 0) for i in range(size)])(tsum.s())
    assert r.get(timeout=TIMEOUT * 8) == sum(range(size))

    events = results.broker.events(f"chord:{r.parent.id}")
    assert [e.type for e in events] == ["ChordPartDone"] * size + ["ChordCompleted"]
    assert results.types(r.id).count("Published") == 1
    assert results.types(r.id).count("Succeeded") == 1


def test_chord_with_a_failing_header_fails_its_callback_and_runs_its_errback(
    results: Results,
) -> None:
    add, boom, tsum = results.task("add"), results.task("boom"), results.task("tsum")
    errback = results.task("errback")
    callback = tsum.s().on_error(errback.s())
    r = chord([add.s(1, 1), boom.s(3), add.s(2, 2)])(callback)

    exc = r.get(propagate=False, timeout=TIMEOUT)
    # Celery's ChordError naming the header task's error, e.g. ChordError("ValueError('boom 3')").
    assert isinstance(exc, ChordError), repr(exc)
    assert "boom 3" in str(exc), str(exc)
    assert r.state == "FAILURE"
    # The callback never ran: its stream holds the failure and nothing else.
    assert results.types(r.id) == ["Failed"]

    wait_for(
        lambda: [run["failed"] for run in results.broker.runs("errback")] == [r.id],
        TIMEOUT,
        "the callback's errback to run",
        show=lambda: results.broker.runs("errback"),
    )
    events = results.broker.events(f"chord:{r.parent.id}")
    parts = [e.event for e in events if isinstance(e.event, lc.ChordPartDone)]
    assert sorted(p.state for p in parts) == ["FAILURE", "SUCCESS", "SUCCESS"]
    assert [e.type for e in events].count("ChordCompleted") == 1
    assert "celery.chord_unlock" not in _published_task_names(results.broker)


# -- 8. forget --------------------------------------------------------------------------


def test_forget_leaves_the_history(results: Results) -> None:
    r = results.task("add").delay(4, 4)
    assert r.get(timeout=TIMEOUT) == 8
    results.broker.wait_for_event(r.id, "Acked")
    history = results.types(r.id)

    r.forget()
    assert results.app.AsyncResult(r.id).state == "PENDING"
    assert results.meta(r.id)["status"] == "PENDING"
    assert results.types(r.id) == [*history, "Forgotten"]


# -- 9. expiry -----------------------------------------------------------------------------


def _cleanup_app(results: Results, **transport: Any) -> Any:
    """Another app on the store whose ``result_expires`` is one second."""
    app = resultproj.make_app(
        results.broker.url, {**results.broker.transport_options(), **transport}
    )
    app.conf.result_expires = 1
    return app


def test_result_expiry_expires_the_result_and_keeps_the_history(results: Results) -> None:
    r = results.task("add").delay(2, 3)
    assert r.get(timeout=TIMEOUT) == 5
    results.broker.wait_for_event(r.id, "Acked")
    history = results.types(r.id)
    store = results.broker.store
    done = store.results([r.id])[r.id][2]
    wait_for(lambda: store.now() > done + 1.2, 10, "the result to be a second old")

    app = _cleanup_app(results)
    try:
        app.tasks["celery.backend_cleanup"].apply().get()  # what celery beat runs
        assert app.AsyncResult(r.id).state == "PENDING"  # as Celery reports expired results
        assert results.types(r.id) == [*history, "ResultExpired"]
        assert store.task_summaries([r.id])[r.id].state == "SUCCESS"
    finally:
        _close_listener(app)  # not app.close(): see second_app


def test_history_retention_prunes_the_history_with_the_cleanup(results: Results) -> None:
    r = results.task("add").delay(3, 3)
    assert r.get(timeout=TIMEOUT) == 6
    results.broker.wait_for_event(r.id, "Acked")
    store = results.broker.store
    last = store.read_stream(r.id)[-1].recorded_at
    wait_for(lambda: store.now() > last + 2.2, 10, "the history to be two seconds old")

    app = _cleanup_app(results, history_retention=2)
    try:
        assert app.backend.history_retention == 2
        app.tasks["celery.backend_cleanup"].apply().get()
        assert store.read_stream(r.id) == []
        assert store.task_summaries([r.id]) == {}
    finally:
        _close_listener(app)


def test_a_task_that_expired_unrun_is_revoked(
    broker: Broker, start_worker: Any, result_app: Any
) -> None:
    r = result_app.tasks["resultproj.add"].apply_async(args=(1, 1), expires=1)
    published = broker.events(r.id)[0].event
    assert isinstance(published, lc.Published) and published.expires is not None
    expires = published.expires
    wait_for(lambda: broker.store.now() > expires + 0.2, 10, "the task to expire")
    assert result_app.AsyncResult(r.id).state == "PENDING"

    start_worker(app="resultproj")
    wait_for(
        lambda: result_app.AsyncResult(r.id).state == "REVOKED",
        TIMEOUT,
        f"{r.id} to be REVOKED",
        show=lambda: (result_app.AsyncResult(r.id).state, broker.types(r.id)),
    )
    exc = r.get(propagate=False, timeout=TIMEOUT)
    assert isinstance(exc, TaskRevokedError), repr(exc)
    events = broker.events(r.id)
    assert [e.type for e in events] == ["Published", "Discarded"]
    assert events[1].event.reason == "expired"
