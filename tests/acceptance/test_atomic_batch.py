"""Atomic enqueue on a SQLAlchemy Connection or Session holds publishes and writes
them as one batch (celery_eventstore.storage.held): still enqueue iff commit, through
commits, rollbacks and savepoints inside the block, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from enqueuer import TASK, business_engine, business_table
from harness import HERE, Broker
from sqlalchemy.orm import Session

from celery_eventstore import atomic
from celery_eventstore.exceptions import DatabaseError, InvalidName, MessageTooLarge
from celery_eventstore.storage import EventStore

# -- helpers ----------------------------------------------------------------------


@pytest.fixture
def app(current_result_app: Any) -> Any:
    return current_result_app


@pytest.fixture
def engine(broker: Broker) -> Iterator[sa.Engine]:
    """The application's engine and its table, in the broker's database."""
    engine = business_engine(broker.db_url)
    business_table(broker.schema).metadata.create_all(engine)
    yield engine
    engine.dispose()


def _begin_with_a_write(conn: sa.Connection, broker: Broker) -> None:
    """Begin as an application does: with a write of its own (on SQLite the
    driver begins the transaction there; a SAVEPOINT before it would not)."""
    conn.execute(business_table(broker.schema).insert().values(id=uuid.uuid4().hex))


class Ids:
    """Task ids of one test, by name."""

    def __init__(self) -> None:
        self.run = uuid.uuid4().hex[:8]

    def __call__(self, name: str) -> str:
        return f"batch-{self.run}-{name}"


def _publish(app: Any, ids: Ids, *names: str) -> None:
    for name in names:
        app.send_task(TASK, task_id=ids(name))


def _published(broker: Broker, ids: Ids, *names: str) -> dict[str, int]:
    """Published events and queue rows per name, as committed."""
    msgs = broker.store.tables.messages
    with broker.store.engine.connect() as conn:
        rows = Counter(conn.execute(sa.select(msgs.c.stream_id)).scalars())
    return {
        n: len([r for r in broker.events(ids(n)) if r.type == "Published"]) * 10 + rows[ids(n)]
        for n in names
    }


def _exactly(broker: Broker, ids: Ids, kept: str, gone: str) -> None:
    """Each of ``kept`` has one Published event and one queue row; ``gone`` none."""
    got = _published(broker, ids, *kept.split(), *gone.split())
    assert got == {**{n: 11 for n in kept.split()}, **{n: 0 for n in gone.split()}}


def _events_seen_by(conn: sa.Connection, broker: Broker, ids: Ids) -> int:
    events = broker.store.tables.events
    return int(conn.execute(
        sa.select(sa.func.count()).where(events.c.stream_id.like(f"batch-{ids.run}-%"))
    ).scalar_one())


# -- one batch, in the right transaction ------------------------------------------------


def test_publishes_are_held_and_written_as_one_batch_at_the_block_exit(
    broker: Broker, app: Any, engine: sa.Engine
) -> None:
    ids = Ids()
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    names = [f"m{i}" for i in range(60)]
    _publish(app, Ids(), "declares-the-queue")  # on its own, before the block
    with engine.connect() as conn, conn.begin():
        _begin_with_a_write(conn, broker)
        sa.event.listen(engine, "before_cursor_execute", seen)
        try:
            with atomic(conn):
                _publish(app, ids, *names)
                assert _events_seen_by(conn, broker, ids) == 0  # held, not written
            assert _events_seen_by(conn, broker, ids) == 60  # in the caller's transaction
        finally:
            sa.event.remove(engine, "before_cursor_execute", seen)
        assert broker.events(ids("m0")) == [] and broker.events(ids("m59")) == []  # not yet
    _exactly(broker, ids, " ".join(names), "")
    # A batch: a handful of statements (log, queue rows, task index, wake-up,
    # savepoint), not one or more per publish.
    writes = [s for s in statements if s.lstrip().upper().startswith(("INSERT", "UPDATE"))]
    assert len(writes) == 3, statements
    assert len(statements) <= 10, statements  # with the two counts above


def test_a_commit_and_a_rollback_inside_the_block(
    broker: Broker, app: Any, engine: sa.Engine
) -> None:
    ids = Ids()
    with engine.connect() as conn:
        with atomic(conn):
            _begin_with_a_write(conn, broker)
            _publish(app, ids, "committed")
            conn.commit()  # written just before this commit, in its transaction
            _exactly(broker, ids, "committed", "")
            _begin_with_a_write(conn, broker)
            _publish(app, ids, "rolled-back")
            conn.rollback()
            _begin_with_a_write(conn, broker)
            _publish(app, ids, "after", "after-2")
        conn.commit()
    _exactly(broker, ids, "committed after after-2", "rolled-back")


def test_savepoints_rolled_back_and_released(broker: Broker, app: Any, engine: sa.Engine) -> None:
    ids = Ids()
    with engine.connect() as conn, conn.begin():
        _begin_with_a_write(conn, broker)
        with atomic(conn):
            _publish(app, ids, "a")
            outer = conn.begin_nested()
            _publish(app, ids, "b")
            inner = conn.begin_nested()
            _publish(app, ids, "c")
            inner.rollback()
            _publish(app, ids, "d")
            outer.commit()  # released: b and d stay
            _publish(app, ids, "e")
            dropped = conn.begin_nested()
            _publish(app, ids, "f")
            dropped.rollback()
            kept = conn.begin_nested()
            _publish(app, ids, "g")
        kept.commit()  # released after the block: g was written into it at exit
    _exactly(broker, ids, "a b d e g", "c f")


def test_a_rolled_back_outer_savepoint_takes_what_was_released_into_it(
    broker: Broker, app: Any, engine: sa.Engine
) -> None:
    ids = Ids()
    with engine.connect() as conn, conn.begin():
        _begin_with_a_write(conn, broker)
        with atomic(conn):
            _publish(app, ids, "before")
            outer = conn.begin_nested()
            _publish(app, ids, "outer")
            with conn.begin_nested():
                _publish(app, ids, "inner")
            outer.rollback()
            _publish(app, ids, "after")
    _exactly(broker, ids, "before after", "outer inner")


def test_a_commit_with_savepoints_still_open(broker: Broker, app: Any, engine: sa.Engine) -> None:
    ids = Ids()
    with engine.connect() as conn:
        with atomic(conn):
            _begin_with_a_write(conn, broker)
            _publish(app, ids, "root")
            conn.begin_nested()
            _publish(app, ids, "nested")
            conn.commit()  # commits the savepoint's work too
    _exactly(broker, ids, "root nested", "")


def test_a_session_spanning_transactions(broker: Broker, app: Any, engine: sa.Engine) -> None:
    """Each publish lands in the transaction the session had open at its delay()."""
    ids = Ids()
    table = business_table(broker.schema)
    with Session(engine) as session:
        with atomic(session):
            session.execute(table.insert().values(id=ids("row-1")))
            _publish(app, ids, "first")
            session.commit()
            _exactly(broker, ids, "first", "")
            session.execute(table.insert().values(id=ids("row-2")))
            _publish(app, ids, "rolled-back")
            session.rollback()
            _publish(app, ids, "second")
            with session.begin_nested():
                _publish(app, ids, "released")
            nested = session.begin_nested()
            _publish(app, ids, "savepoint-rolled-back")
            nested.rollback()
            session.commit()
            _publish(app, ids, "never-committed")  # written at exit, gone with close()
    _exactly(broker, ids, "first second released",
             "rolled-back savepoint-rolled-back never-committed")


def test_an_exception_inside_the_block(broker: Broker, app: Any, engine: sa.Engine) -> None:
    ids = Ids()

    class Boom(Exception):
        pass

    with pytest.raises(Boom), engine.connect() as conn, conn.begin():
        _begin_with_a_write(conn, broker)
        with atomic(conn):
            _publish(app, ids, "raised")
            raise Boom()

    # The caller catches it and commits: what was published before the exception
    # is in the committed transaction, as a write-through publish was.
    with engine.connect() as conn, conn.begin():
        _begin_with_a_write(conn, broker)
        with pytest.raises(Boom), atomic(conn):
            _publish(app, ids, "caught")
            raise Boom()
    _exactly(broker, ids, "caught", "raised")


@pytest.mark.parametrize("broker", ["postgresql"], indirect=True)
def test_a_failed_transaction_keeps_the_blocks_own_exception(
    broker: Broker, app: Any, engine: sa.Engine
) -> None:
    ids = Ids()
    with engine.connect() as conn, conn.begin():
        _begin_with_a_write(conn, broker)
        with pytest.raises(sa.exc.ProgrammingError, match="no_such_table"), atomic(conn):
            _publish(app, ids, "doomed")
            conn.execute(sa.text("SELECT * FROM no_such_table"))
        conn.rollback()
    _exactly(broker, ids, "", "doomed")


def test_a_batch_that_cannot_be_written_stops_the_commit(
    broker: Broker, app: Any, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write before a commit fails: the commit fails too, so the caller's
    rows never commit without their jobs."""
    ids = Ids()
    table = business_table(broker.schema)
    real = EventStore.publish_checked

    def refused(self: EventStore, *args: Any, **kwargs: Any) -> Any:
        raise DatabaseError("refused by the test")

    with engine.connect() as conn:
        with atomic(conn):
            conn.execute(table.insert().values(id=ids("row")))
            _publish(app, ids, "job")
            monkeypatch.setattr(EventStore, "publish_checked", refused)
            with pytest.raises(DatabaseError, match="refused by the test"):
                conn.commit()
            monkeypatch.setattr(EventStore, "publish_checked", real)
            conn.rollback()
    with engine.connect() as conn:
        assert conn.execute(sa.select(table.c.id).where(table.c.id == ids("row"))).all() == []
    _exactly(broker, ids, "", "job")


def test_what_a_publish_refuses_is_refused_at_the_call(
    broker: Broker, app: Any, engine: sa.Engine
) -> None:
    import resultproj

    small = resultproj.make_app(
        broker.url, {**broker.transport_options(), "max_message_size": 2000}
    )
    ids = Ids()
    with engine.connect() as conn, conn.begin():
        _begin_with_a_write(conn, broker)
        with atomic(conn, app=app):
            _publish(app, ids, "kept")
            with pytest.raises(InvalidName):
                app.send_task(TASK, task_id="x" * 5000)
            with pytest.raises(InvalidName):
                app.send_task(TASK, queue="q" * 5000)
        with atomic(conn, app=small):
            with pytest.raises(MessageTooLarge):
                small.send_task(TASK, args=["y" * 5000], task_id=ids("too-large"))
    _exactly(broker, ids, "kept", "too-large")


# -- a race of real processes ------------------------------------------------------------

PRODUCERS = 3
CONSUMERS = 2
BLOCKS = 8
BLOCK = 40


def test_producers_commit_and_roll_back_blocks_while_consumers_drain(
    broker: Broker, engine: sa.Engine, tmp_path: Path
) -> None:
    """Producer processes publish blocks of many tasks in atomic() and commit or
    roll back (whole blocks, savepoints inside them) while consumer processes
    claim and ack: every committed task is delivered exactly once, no
    rolled-back one ever exists."""
    broker.store.migrate()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    stop = tmp_path / "stop"

    def start(mode: str, config: dict[str, Any]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "batch_enqueuer", mode, json.dumps(config)],
            cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    consumers = [
        start("consume", {
            "db_url": broker.db_url, "stop": str(stop),
            "store_options": {"schema": broker.schema} if broker.schema else {},
        })
        for _ in range(CONSUMERS)
    ]
    producers = [
        start("produce", {
            "broker_url": broker.url, "options": broker.transport_options(),
            "db_url": broker.db_url, "schema": broker.schema, "prefix": f"p{n}",
            "blocks": BLOCKS, "block": BLOCK, "seed": random.randrange(1 << 30),
        })
        for n in range(PRODUCERS)
    ]
    lines: list[str] = []
    try:
        for proc in producers:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            lines += out.splitlines()
    finally:
        stop.touch()  # the consumers drain what is left, then stop
    for proc in consumers:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        lines += out.splitlines()
    seen: dict[str, list[str]] = {"committed": [], "rolledback": [], "delivered": []}
    for line in lines:
        what, task_id = line.split(" ", 1)
        seen[what].append(task_id)
    committed, rolled_back = set(seen["committed"]), set(seen["rolledback"])
    assert committed and rolled_back
    delivered = Counter(seen["delivered"])
    assert set(delivered) == committed
    assert set(delivered.values()) == {1}
    streams = {r.stream for r in broker.store.read_all(limit=100_000)}
    assert committed <= streams
    assert not streams & rolled_back


def test_a_long_block_writes_as_it_goes(broker: Broker, app: Any, engine: sa.Engine,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_HELD publishes a batch is written into the open transaction, so a
    block holds a bounded number; a rollback still takes them all."""
    from celery_eventstore.storage import held

    monkeypatch.setattr(held, "MAX_HELD", 5)
    ids = Ids()
    names = [f"n{i}" for i in range(12)]
    with engine.connect() as conn:
        conn.begin()
        _begin_with_a_write(conn, broker)
        with atomic(conn):
            _publish(app, ids, *names)
            assert _events_seen_by(conn, broker, ids) == 10  # two batches of 5 written
        conn.rollback()
        conn.begin()
        _begin_with_a_write(conn, broker)
        with atomic(conn):
            _publish(app, ids, "kept")
        conn.commit()
    _exactly(broker, ids, "kept", " ".join(names))
