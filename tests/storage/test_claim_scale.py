"""Claims at scale: a backlog of messages scheduled for later is never read by a
claim, on either dialect and whatever the planner's statistics, and scheduled
messages still become claimable exactly when due, in priority order."""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from storehelpers import FakeClock, race_consumers

from celery_eventstore.storage import EventStore, NewMessage

#: Messages scheduled for later; a claim that read them would read this many rows.
BACKLOG = 3000
READY = 50
LIMIT = 10


def msg(stream: str, queue: str = "q", **kw: Any) -> NewMessage:
    return NewMessage(stream=stream, queue=queue, message={"body": stream}, **kw)


@pytest.fixture
def store(db: tuple[Any, dict[str, Any]], clock: FakeClock) -> Iterator[EventStore]:
    url, options = db
    store = EventStore(url, clock=clock, **options)
    store.migrate()
    yield store
    store.close()


def publish(store: EventStore, messages: list[NewMessage]) -> None:
    for start in range(0, len(messages), 500):
        store.publish(messages[start:start + 500])


# -- what a claim reads -------------------------------------------------------------


def rows_read(store: EventStore, queues: list[str], now: float, limit: int) -> int:
    """The work of the claim's nomination: rows of the messages table it reads
    (and steps over) on PostgreSQL, virtual machine steps on SQLite."""
    queries = store.queries
    return work(store, queries.nominate(len(queues)), queries.nominate_params(queues, now, limit))


def walk_in_claim_order(store: EventStore, now: float) -> int:
    """The same measure for what claims did before the scheduled index: every due
    message in claim order, stepping over those not due (the control: the measure
    sees a backlog that is read)."""
    msgs = store.tables.messages
    statement = (
        sa.select(msgs.c.delivery_id)
        .where(msgs.c.queue == "q", msgs.c.available_at <= now)
        .order_by(msgs.c.priority.desc(), msgs.c.seq)
        .limit(LIMIT)
    )
    return work(store, statement, {})


def work(store: EventStore, statement: Any, params: dict[str, Any]) -> int:
    if store.dialect_name == "postgresql":
        return _postgresql_rows_read(store, statement, params)
    return _sqlite_steps(store, statement, params)


def _postgresql_rows_read(store: EventStore, statement: Any, params: dict[str, Any]) -> int:
    compiled = statement.compile(store.engine, compile_kwargs={"render_postcompile": True})
    table = store.tables.messages.name
    with store.engine.begin() as conn:
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        cursor.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {compiled}",
                       compiled.construct_params(params))
        plan = cursor.fetchone()[0]
        conn.rollback()  # EXPLAIN ANALYZE took the row locks
    read = 0
    for node in _nodes(plan[0]["Plan"]):
        if node.get("Relation Name") == table:
            read += node["Actual Rows"] * node["Actual Loops"]
            read += node.get("Rows Removed by Filter", 0) + node.get(
                "Rows Removed by Index Recheck", 0
            )
    return read


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from _nodes(child)


def _sqlite_steps(store: EventStore, statement: Any, params: dict[str, Any]) -> int:
    """SQLite's virtual machine steps for the nomination: grows with the rows read."""
    sql = str(statement.compile(store.engine))
    compiled = statement.compile(store.engine)
    bound = compiled.construct_params(params)
    # A list parameter (the nomination's ``known``) goes as one JSON array, as
    # the dialect's bind processing sends it.
    values = [
        json.dumps(bound[name]) if isinstance(bound[name], list) else bound[name]
        for name in compiled.positiontup or ()
    ]
    raw = store.engine.raw_connection()
    try:
        steps = [0]

        def step() -> int:
            steps[0] += 1
            return 0

        raw.driver_connection.set_progress_handler(step, 1)
        raw.cursor().execute(sql, values).fetchall()
        raw.driver_connection.set_progress_handler(None, 1)
        return steps[0]
    finally:
        raw.close()


def analyze(store: EventStore) -> None:
    name = store.engine.dialect.identifier_preparer.format_table(store.tables.messages)
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"ANALYZE {name}")


@pytest.mark.slow
def test_a_backlog_scheduled_for_later_is_never_read(store, clock):
    publish(store, [msg(f"ready-{i}", priority=i % 3) for i in range(READY)])
    publish(store, [msg(f"due-{i}", not_before=clock.now - 1) for i in range(3)])
    baseline = rows_read(store, ["q"], clock.now, LIMIT)
    # Published after the ready ones, scheduled before them, and published before:
    # either way an index walk in claim order would step over every one.
    publish(store, [msg(f"later-{i}", not_before=clock.now + 3600 + i) for i in range(BACKLOG)])
    publish(store, [msg(f"ready-late-{i}") for i in range(READY)])
    for statistics in ("none", "analyzed"):
        if statistics == "analyzed":
            analyze(store)
        read = rows_read(store, ["q"], clock.now, LIMIT)
        control = walk_in_claim_order(store, clock.now)
        if store.dialect_name == "postgresql":
            # At most the messages that are not scheduled for later (the planner
            # may read a few dozen and sort them rather than walk an index).
            assert read <= 2 * READY + 3, (statistics, read)
            assert control >= BACKLOG, (statistics, control)
        else:
            assert read <= 1.5 * baseline, (statistics, baseline, read)
            assert control > 3 * baseline, (statistics, baseline, control)


@pytest.mark.slow
def test_rows_read_stay_bounded_with_several_queues_and_a_ready_backlog(store, clock):
    for queue in ("a", "b"):
        publish(store, [msg(f"{queue}-later-{i}", queue, not_before=clock.now + 60)
                        for i in range(BACKLOG // 2)])
        publish(store, [msg(f"{queue}-{i}", queue) for i in range(BACKLOG // 2)])
    analyze(store)
    read = rows_read(store, ["a", "b"], clock.now, LIMIT)
    if store.dialect_name == "postgresql":
        assert read <= 2 * 2 * LIMIT, read  # two queues, two arms, LIMIT each
    else:
        assert read < BACKLOG, read  # a few steps per row read, were any read


@pytest.mark.slow
def test_the_next_eta_is_found_without_reading_the_backlog(store, clock):
    """A consumer asks for the next ETA after each short claim: one statement that
    reads the first entry of each queue's scheduled index, however many wait."""
    for queue in ("a", "b"):
        publish(store, [msg(f"{queue}-later-{i}", queue, not_before=clock.now + 60 + i)
                        for i in range(BACKLOG // 2)])
    queries = store.queries
    params = {"after": clock.now, "queue_0": "a", "queue_1": "b"}
    for statistics in ("none", "analyzed"):
        if statistics == "analyzed":
            analyze(store)
        assert store.earliest_due(["a", "b"], clock.now) == clock.now + 60
        read = work(store, queries.earliest_due(2), params)
        if store.dialect_name == "postgresql":
            assert read <= 2, (statistics, read)  # the first entry of each queue
        else:
            msgs = store.tables.messages
            every_eta = sa.select(sa.func.count()).where(
                sa.or_(msgs.c.queue == "a", msgs.c.queue == "b"),
                msgs.c.not_before > clock.now,
            )
            control = work(store, every_eta, {})  # counts every scheduled message
            assert control > BACKLOG, (statistics, control)
            assert read < control / 20, (statistics, read, control)


# -- what a claim returns -----------------------------------------------------------


def claimed(store: EventStore, queues: list[str], limit: int = 100) -> list[str]:
    return [m.stream for m in store.claim(queues, limit, "w", 30)]


def test_scheduled_messages_become_claimable_exactly_when_due(store, clock):
    store.publish([
        msg("at-10", not_before=clock.now + 10), msg("at-20", not_before=clock.now + 20)
    ])
    clock.advance(9.999)
    assert claimed(store, ["q"]) == []
    clock.advance(0.001)
    assert claimed(store, ["q"]) == ["at-10"]
    clock.advance(10)
    assert claimed(store, ["q"]) == ["at-20"]


def test_priorities_order_due_scheduled_and_ready_messages_together(store, clock):
    store.publish([
        msg("ready-low", priority=1),
        msg("due-high", priority=9, not_before=clock.now + 5),
        msg("due-low", priority=0, not_before=clock.now + 5),
        msg("ready-high", priority=5),
        msg("later-top", priority=9, not_before=clock.now + 500),
    ])
    clock.advance(5)
    assert claimed(store, ["q"], 1) == ["due-high"]
    assert claimed(store, ["q"]) == ["ready-high", "ready-low", "due-low"]


def test_the_limit_holds_across_queues_and_kinds(store, clock):
    eta = {"now": {}, "eta": {"not_before": clock.now + 1}}
    store.publish([msg(f"{q}-{kind}-{i}", q, **eta[kind])
                   for q in ("a", "b") for kind in eta for i in range(3)])
    clock.advance(1)
    first = claimed(store, ["a", "b"], 4)
    assert len(first) == 4
    rest = claimed(store, ["a", "b", "a"])
    assert sorted(first + rest) == sorted(
        f"{q}-{kind}-{i}" for q in ("a", "b") for kind in ("now", "eta") for i in range(3)
    )


def test_an_expired_lease_on_a_scheduled_message_is_claimable_again(store, clock):
    store.publish([msg("eta", not_before=clock.now + 1)])
    clock.advance(1)
    assert claimed(store, ["q"]) == ["eta"]
    clock.advance(29)
    assert claimed(store, ["q"]) == []
    clock.advance(1)
    again = store.claim(["q"], 1, "w2", 30)
    assert [m.stream for m in again] == ["eta"] and again[0].redelivered


# -- racing consumers ---------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def race_db(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(f"{request.param}_db")


@pytest.mark.slow
def test_racing_consumers_of_ready_and_due_messages_take_each_once(race_db):
    url, options = race_db
    store = EventStore(url, **options)
    store.migrate()
    now = store.now()
    messages = [
        msg(f"{q}-{i}", q, priority=i % 4,
            **({"not_before": now - 1} if i % 2 else {}))  # half of them due by an ETA
        for q in ("a", "b") for i in range(600)
    ]
    messages += [msg(f"later-{i}", "a", not_before=now + 3600) for i in range(200)]
    publish(store, messages)
    results = race_consumers(store, options, ["a", "b"], 6, 10)
    delivered = collections.Counter(stream for r in results for stream in r)
    assert len(delivered) == 1200 and max(delivered.values()) == 1
    assert sum(1 for r in results if r) > 1, "only one process got work: no race happened"
    assert store.queue_size("a") == 200
    store.close()
