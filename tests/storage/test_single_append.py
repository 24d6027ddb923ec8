"""A worker's result write: its read, then one statement where the database can
take it (PostgreSQL), issue 15.

The store contract runs these commands on every dialect; the tests below check
what it cannot see: the statements sent, the wake-up, and processes racing
result writes -- fenced and duplicate ones -- against a real database.
"""

from __future__ import annotations

import collections
import multiprocessing
import time
from typing import Any

import pytest
import sqlalchemy as sa
from storehelpers import executed_statements, make_factory

from celery_eventstore import lifecycle as lc
from celery_eventstore.storage import EventStore, NewMessage

#: Statements a result write sends besides BEGIN and COMMIT, by dialect: the
#: stream's read (bringing the clock), then the append with its derived rows
#: and wake-up -- one statement on PostgreSQL; the event, the results row and
#: the task-index row apart on SQLite (no NOTIFY to send there).
RESULT_STATEMENTS = {"postgresql": 2, "sqlite": 4}

RESULT_COMMANDS = {
    "start": lambda claim: lc.Start(worker="w1", result={"pid": 1}, claim=claim),
    "succeed": lambda claim: lc.Succeed({"r": 1}, claim=claim),
    "fail": lambda claim: lc.Fail(exc="ValueError('x')", traceback="tb", result={"e": 1},
                                  claim=claim),
    "retry": lambda claim: lc.ScheduleRetry(exc="Retry()", countdown=5, result={"e": 2},
                                            claim=claim),
}


@pytest.fixture
def store(db):
    factory = make_factory(db)
    yield next(factory)()
    next(factory, None)


def claimed(store: EventStore, stream: str, lease: float = 30) -> Any:
    store.publish([NewMessage(stream=stream, queue="rq", message={"body": stream},
                              metadata={"task": "app.add"})])
    (held,) = store.claim(["rq"], 1, "c", lease)
    return held


def writes(sent: list[str]) -> list[str]:
    return [s for s in sent if s.split(None, 1)[0].upper() not in ("BEGIN", "COMMIT")]


@pytest.mark.parametrize("command", sorted(RESULT_COMMANDS))
def test_a_result_write_costs_its_read_and_one_statement_on_postgresql(store, command):
    held = claimed(store, "t1")
    with executed_statements() as sent:
        (recorded,) = store.execute("t1", RESULT_COMMANDS[command](held.claim))
    assert len(writes(sent)) == RESULT_STATEMENTS[store.db.dialect.name], sent
    assert recorded.position == store.last_position() and recorded.version == 3
    assert store.read_stream("t1")[-1] == recorded
    live = store.projection_rows()
    store.rebuild()
    assert store.projection_rows() == live


#: Statements a result write decided on its claim's state sends, by dialect:
#: the append alone on PostgreSQL (it takes its time from the clock itself);
#: SQLite reads as without the state.
RESULT_FROM_CLAIM_STATEMENTS = {"postgresql": 1, "sqlite": RESULT_STATEMENTS["sqlite"]}


@pytest.mark.parametrize("command", ["fail", "retry", "succeed"])
def test_a_result_from_its_claims_state_is_one_statement_on_postgresql(store, command):
    held = claimed(store, "t1")
    with executed_statements() as sent:
        (recorded,) = store.execute("t1", RESULT_COMMANDS[command](held.claim), known=held.state)
    assert len(writes(sent)) == RESULT_FROM_CLAIM_STATEMENTS[store.db.dialect.name], sent
    assert recorded.position == store.last_position() and recorded.version == 3
    assert store.read_stream("t1")[-1] == recorded
    assert recorded.recorded_at >= store.read_stream("t1")[-2].recorded_at
    live = store.projection_rows()
    store.rebuild()
    assert store.projection_rows() == live


@pytest.mark.parametrize("command", ["fail", "retry", "succeed"])
def test_a_result_write_is_rendered_once_not_at_every_execution(store, command):
    """Its statement holds no list bound as a parameter, which SQLAlchemy would
    expand into the text again at every execution (and which, prepared on the
    server, would be a new statement for each length)."""
    held = claimed(store, "t1")
    expanded: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
               executemany: bool) -> None:
        compiled = getattr(context, "compiled", None)
        if compiled is not None and compiled.post_compile_params:
            expanded.append(compiled.string)

    sa.event.listen(store.engine, "before_cursor_execute", record)
    try:
        store.execute("t1", RESULT_COMMANDS[command](held.claim), known=held.state)
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", record)
    assert expanded == []


@pytest.mark.parametrize("db", ["psycopg2", "psycopg"], indirect=True)
@pytest.mark.parametrize("command", ["succeed", "fail"])
def test_a_result_is_a_read_and_a_write_each_committing_as_it_runs(store, command):
    """No BEGIN before the read, no COMMIT after the write (psycopg2 sends each
    apart): after each of the two statements the server holds no transaction
    open on the connection, and the result is there for another connection."""
    held = claimed(store, "t1")
    status_after: list[int] = []

    def after(conn, cursor, statement, *args):
        status_after.append(int(conn.connection.dbapi_connection.info.transaction_status))

    sa.event.listen(store.engine, "after_cursor_execute", after)
    try:
        store.execute("t1", RESULT_COMMANDS[command](held.claim))
    finally:
        sa.event.remove(store.engine, "after_cursor_execute", after)
    assert status_after == [0, 0], status_after  # TRANSACTION_STATUS_IDLE
    state = {"succeed": "SUCCESS", "fail": "FAILURE"}[command]
    assert store.results(["t1"])["t1"][0] == state


def test_events_of_one_decision_go_together_positions_in_version_order(store):
    """A revoke of a task with two waiting messages is three events (the
    revoke, a discard each): one statement on PostgreSQL, whose chained
    inserts number them in the order of their versions, as the generic path."""
    for queue in ("rq", "rq2"):  # two queues: no "ready" wake-up is owed meanwhile
        store.publish([NewMessage(stream="t1", queue=queue, message={})])
    with executed_statements() as sent:
        recorded = store.execute("t1", lc.Revoke(reason="stop"))
    assert [r.type for r in recorded] == ["Revoked", "Discarded", "Discarded"]
    assert len(writes(sent)) == {"postgresql": 2, "sqlite": 6}[store.db.dialect.name], sent
    assert [r.position for r in recorded] == sorted(r.position for r in recorded)
    assert [r.position for r in store.read_stream("t1")[2:]] == [r.position for r in recorded]
    assert store.queue_size("rq") == store.queue_size("rq2") == 0
    assert store.results(["t1"])["t1"][0] == "REVOKED"
    live = store.projection_rows()
    store.rebuild()
    assert store.projection_rows() == live


@pytest.mark.parametrize("db", ["psycopg2"], indirect=True)
def test_a_projection_it_cannot_carry_makes_the_one_statement_step_aside(store, monkeypatch):
    """Should the projection make a change of many rows (a projection added
    later), the write takes the generic path: nothing derived is skipped."""
    from celery_eventstore.storage import single_append

    def with_many_rows(queries, recorded, states):
        many = [{"deliveries": ["a"]}, {"deliveries": ["b"]}]
        return [*captured(queries, recorded, states), (queries.delete_dead_letters, many)]

    captured = single_append.captured
    monkeypatch.setattr(single_append, "captured", with_many_rows)
    held = claimed(store, "t1")
    with executed_statements() as sent:
        store.execute("t1", lc.Succeed({"r": 1}, claim=held.claim))
    assert len(writes(sent)) == 5, sent  # read, event, results row, task row, NOTIFY
    assert store.results(["t1"])["t1"][:2] == ("SUCCESS", {"r": 1})
    live = store.projection_rows()
    store.rebuild()
    assert store.projection_rows() == live


def test_a_started_task_then_its_result_derive_what_a_rebuild_does(store):
    held = claimed(store, "t1")
    store.execute("t1", lc.Start(worker="w1", claim=held.claim))
    store.execute("t1", lc.Succeed({"r": 1}, claim=held.claim))
    state, result, done = store.results(["t1"])["t1"]
    assert (state, result) == ("SUCCESS", {"r": 1}) and done is not None
    (summary,) = store.tasks()
    assert (summary.state, summary.worker) == ("SUCCESS", "w1")
    live = store.projection_rows()
    store.rebuild()
    assert store.projection_rows() == live


def test_a_fenced_result_is_recorded_in_as_few_statements_and_changes_no_result(store):
    old = claimed(store, "t1", lease=0.2)
    time.sleep(0.5)
    (new,) = store.claim(["rq"], 1, "c2", 30)
    store.execute("t1", lc.Succeed({"r": "new"}, claim=new.claim))
    with executed_statements() as sent:
        fenced = store.execute("t1", lc.Succeed({"r": "old"}, claim=old.claim))
    assert [r.event for r in fenced] == [lc.ResultFenced(old.delivery, old.claim, "SUCCESS")]
    assert len(writes(sent)) <= RESULT_STATEMENTS[store.db.dialect.name], sent
    assert store.results(["t1"])["t1"][1] == {"r": "new"}
    live = store.projection_rows()
    store.rebuild()
    assert store.projection_rows() == live


@pytest.mark.parametrize("db", ["psycopg2", "psycopg"], indirect=True)
def test_a_result_in_one_statement_wakes_its_waiter(store):
    held = claimed(store, "t1")
    listener = store.listener(results=["t1"])
    try:
        listener.poll()
        store.execute("t1", lc.Succeed({"r": 1}, claim=held.claim))
        woken = listener.wait(10)
    finally:
        listener.close()
    assert "t1" in woken


def write_results(url: str, options: dict[str, Any],
                  writes: list[tuple[str, str, str, lc.JobState | None]], out: Any) -> None:
    """A racing worker: writes each (stream, claim, result, state its claim
    left or None) as a Succeed."""
    store = EventStore(url, **options)
    try:
        for stream, claim, result, known in writes:
            store.execute(stream, lc.Succeed({"r": result}, claim=claim), known=known)
        out.put(len(writes))
    except Exception as exc:  # reported to the test instead of hanging it
        out.put(repr(exc))
    finally:
        store.close()


@pytest.mark.parametrize("db", ["sqlite", "psycopg2"], indirect=True)
@pytest.mark.parametrize("from_claim_state", [False, True], ids=["read", "claim-state"])
def test_racing_result_writes_record_one_outcome_and_fence_the_old_claim(
    store, from_claim_state
):
    """Each of 60 tasks was claimed, lost its lease and was claimed again; four
    processes write results for all of them at once, two under the old claim
    and two under the new one.  Each task ends with one Succeeded (the new
    claim's), the old claim's writes fenced, and the read models as a rebuild
    makes them.  ``claim-state``: each write is decided on the state its claim
    left (the old claim's is stale by then; the new claim's two writers race
    from one state)."""
    streams = [f"race-{i}" for i in range(60)]
    store.publish([NewMessage(stream=s, queue="rq", message={"n": s}) for s in streams])
    old = {m.stream: m for m in store.claim(["rq"], 100, "old", 0.2)}
    time.sleep(0.5)
    new = {m.stream: m for m in store.claim(["rq"], 100, "new", 60)}
    assert set(old) == set(new) == set(streams)
    plans = [
        [(s, claims[s].claim, name, claims[s].state if from_claim_state else None)
         for s in streams[::direction]]
        for name, claims in (("old", old), ("new", new))
        for direction in (1, -1)
    ]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    url = store.url.render_as_string(hide_password=False)
    options = {"schema": store.schema, "table_prefix": store.table_prefix}
    procs = [ctx.Process(target=write_results, args=(url, options, plan, out)) for plan in plans]
    for p in procs:
        p.start()
    results = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert results == [len(streams)] * 4, results
    for stream in streams:
        types = collections.Counter(r.type for r in store.read_stream(stream))
        assert (types["Succeeded"], types["ResultFenced"]) == (1, 2), (stream, types)
        versions = [r.version for r in store.read_stream(stream)]
        assert versions == list(range(1, len(versions) + 1))
    done = store.results(streams)
    assert {s: done[s][:2] for s in streams} == {s: ("SUCCESS", {"r": "new"}) for s in streams}
    live = store.projection_rows()
    store.rebuild()
    assert store.projection_rows() == live
