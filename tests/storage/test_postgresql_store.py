"""The store contract on PostgreSQL, with both drivers."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from contract import StoreContract
from storehelpers import executed_statements, make_factory

from celery_eventstore.exceptions import ConfigurationError, SchemaOutdated
from celery_eventstore.storage import SCHEMA_VERSION

#: ``prepare_threshold`` of each variant: every statement prepared on the server
#: by the store (at its first run), or none (the claims' nomination then brings
#: the settled streams' tails); without one, after five runs.
THRESHOLDS = {"prepared": "0", "unprepared": "none"}


@pytest.fixture(params=["psycopg2", "psycopg", "psycopg2-prepared", "psycopg2-unprepared"])
def driver_db(request, postgresql_db):
    """Each driver, and psycopg2 with each other ``prepare_threshold`` (THRESHOLDS)."""
    url, options = postgresql_db
    driver, _, variant = request.param.partition("-")
    url = sa.make_url(url).set(drivername=f"postgresql+{driver}")
    if variant:
        url = url.update_query_dict({"prepare_threshold": THRESHOLDS[variant]})
    return url, options


class TestPostgreSQLStore(StoreContract):
    @pytest.fixture
    def make_store(self, driver_db):
        yield from make_factory(driver_db)


class TestPartitionedPostgreSQLStore(StoreContract):
    """The whole contract on a log partitioned by day, with today's partition and
    the next ones made (so events land in daily partitions, not the DEFAULT one)."""

    @pytest.fixture
    def make_store(self, postgresql_db):
        url, options = postgresql_db
        factory = make_factory((url, {**options, "partitioned_log": True}))
        make = next(factory)

        def partitioned(*, migrate: bool = True, **kw):
            store = make(migrate=migrate, **kw)
            if migrate:
                store.maintain(2)
            return store

        yield partitioned
        next(factory, None)

    def test_an_older_schema_is_reported_and_upgraded(self, make_store):
        """A log that existed before is upgraded as it is, not partitioned: the
        option says so rather than leave the operator believing it is."""
        store = make_store(migrate=False)
        assert store.migrate(to_version=1) == [1]
        with pytest.raises(SchemaOutdated, match="migrate"):
            store.check_schema()
        with pytest.raises(ConfigurationError, match="created unpartitioned"):
            store.migrate()
        assert store.schema_version() == SCHEMA_VERSION


@pytest.fixture
def one_session_store(driver_db):
    factory = make_factory(driver_db)
    make = next(factory)
    # One pooled connection, so every transaction shares the session; sessions
    # start with synchronous_commit on, whatever the server's default, so a
    # relaxed setting that leaks shows.
    yield make(engine_options={
        "pool_size": 1, "max_overflow": 0,
        "connect_args": {"options": "-c synchronous_commit=on"},
    })
    next(factory, None)


class TestCommitDurability:
    """Claims and acks commit with synchronous_commit off, set for their own
    transaction only; publishes and results on the same pooled connection still
    wait for the disk, whatever ran or rolled back before them."""

    @pytest.fixture
    def store(self, one_session_store):
        return one_session_store

    @staticmethod
    def setting(conn: sa.Connection) -> str:
        return conn.exec_driver_sql("SHOW synchronous_commit").scalar_one()

    def test_relaxed_work_then_durable_work_on_one_session(self, store):
        from celery_eventstore.storage.records import NewMessage

        store.publish([NewMessage(stream="s1", queue="q", message={"body": "1"})])
        with store._write(durable=False) as conn:
            assert self.setting(conn) == "off"
        with store._write(durable=False) as conn:
            assert self.setting(conn) == "off"
        with store.transaction() as conn:
            assert self.setting(conn) == "on"
        # The claim is relaxed, the next publish is not.
        assert store.claim(["q"], 1, "c", 30)
        with store.transaction() as conn:
            assert self.setting(conn) == "on"

    def test_rolled_back_setting_is_set_again(self, store):
        with pytest.raises(RuntimeError), store._write(durable=False) as conn:
            assert self.setting(conn) == "off"
            raise RuntimeError("roll back the SET with the transaction")
        with store._write(durable=False) as conn:
            assert self.setting(conn) == "off"

    def test_async_commit_off_leaves_the_server_setting_alone(self, driver_db):
        factory = make_factory(driver_db)
        store = next(factory)(async_commit=False)
        with store.engine.connect() as conn:
            server_default = self.setting(conn)  # off on the tests' throwaway server
        with store._write(durable=False) as conn:
            assert self.setting(conn) == server_default
        with store.transaction() as conn:
            assert self.setting(conn) == server_default
        next(factory, None)


class TestNoRelaxedSettingOutlivesItsTransaction:
    """Every kind of relaxed transaction, committed or rolled back, then every kind
    of durable one: each durable commit waits for the disk."""

    @pytest.fixture
    def store(self, one_session_store):
        return one_session_store

    @pytest.fixture
    def commits(self, store):
        seen: list[str] = []

        def at_commit(conn: sa.Connection) -> None:
            cursor = conn.connection.dbapi_connection.cursor()
            cursor.execute("SHOW synchronous_commit")
            seen.append(cursor.fetchone()[0])
            cursor.close()

        sa.event.listen(store.engine, "commit", at_commit)
        return seen

    @staticmethod
    def relaxed_work(store):
        from celery_eventstore import lifecycle as lc
        from celery_eventstore.storage import NewMessage

        def claim_renew_ack():
            store.publish([NewMessage(stream="r", queue="rq", message={})])
            [held] = store.claim(["rq"], 1, "c", 30)
            store.renew([held.ref], 30)
            store.ack([held.ref])

        def started():
            store.execute("r", lc.Start())

        def rolled_back():
            with pytest.raises(RuntimeError), store._write(durable=False):
                raise RuntimeError("roll back a relaxed transaction")

        def clock():
            store.clock_skew()

        def routing():
            store.touch_queues(["rq"])
            store.put_transient([("tq", {"body": "x"}, 0, None)])
            store.take_transient(["tq"], 1)

        return [claim_renew_ack, started, rolled_back, clock, routing]

    @staticmethod
    def durable_work(store):
        from celery_eventstore import lifecycle as lc
        from celery_eventstore.storage import NewMessage

        def publish():
            store.publish([NewMessage(stream=f"d{uuid.uuid4().hex}", queue="dq", message={})])

        def result():
            stream = f"s{uuid.uuid4().hex}"
            store.execute(stream, lc.Succeed({"result": 1}))

        def revoke():
            store.revoke(f"v{uuid.uuid4().hex}")

        def dead_letter():
            store.publish([NewMessage(stream=f"x{uuid.uuid4().hex}", queue="xq", message={})])
            [held] = store.claim(["xq"], 1, "c", 30)
            store.reject([held.ref], requeue=False)

        return [publish, result, revoke, dead_letter]

    @pytest.fixture
    def autocommitted(self, store):
        """For each statement that committed as it ran (the driver in autocommit,
        no transaction of ours around it): whether its commit waited for the disk
        -- the session's setting, unless the statement relaxed its own commit."""
        seen: list[str] = []

        def after(conn, cursor, statement, parameters, context, executemany):
            dbapi_connection = conn.connection.dbapi_connection
            if not dbapi_connection.autocommit:
                return
            relaxed = isinstance(parameters, dict) and parameters.get("relaxed") is True
            check = dbapi_connection.cursor()
            check.execute("SHOW synchronous_commit")
            seen.append("off" if relaxed else check.fetchone()[0])
            check.close()

        sa.event.listen(store.engine, "after_cursor_execute", after)
        yield seen
        sa.event.remove(store.engine, "after_cursor_execute", after)

    def test_relaxed_work_whose_read_brings_the_clock_commits_relaxed(
        self, store, commits, autocommitted
    ):
        """A start or an ack reads its stream first, and that read brings the
        transaction's clock and its relaxed commit (no statement of their own):
        they still commit without waiting for the disk; a result still waits --
        its read and its write each commit as they run, with the session's
        setting."""
        from celery_eventstore import lifecycle as lc
        from celery_eventstore.storage import NewMessage

        store.publish([NewMessage(stream="f", queue="fq", message={})])
        [held] = store.claim(["fq"], 1, "c", 30)
        seen = {}
        for name, work in [
            ("start", lambda: store.execute("f", lc.Start(worker="w", claim=held.claim))),
            ("result", lambda: store.execute("f", lc.Succeed({"r": 1}, claim=held.claim))),
            ("ack", lambda: store.ack([held.ref])),
        ]:
            commits.clear()
            autocommitted.clear()
            with executed_statements() as sent:
                work()
            if name == "result":
                assert not commits and len(autocommitted) == 2, (commits, autocommitted)
                (seen[name],) = set(autocommitted)
            else:
                assert not autocommitted, autocommitted
                seen[name] = commits[-1]
            assert not [s for s in sent if s.lstrip().startswith("SELECT extract")], sent
        assert seen == {"start": "off", "ack": "off", "result": "on"}

    def test_a_claim_round_is_its_nomination_and_its_writes(self, store, commits):
        """A consumer's steady round -- ack one, claim a fresh one, look up the
        next ETA -- sends no read, no clock statement and no ETA lookup of its
        own: the nomination brings the transaction's clock (and its relaxed
        commit), the next ETA, the fresh stream's one event, and finds that the
        acked stream has not moved past the state its claim left; its writes
        (events and derived rows) are one statement."""
        from celery_eventstore import lifecycle as lc
        from celery_eventstore.storage import NewMessage

        store.publish([NewMessage(stream="a", queue="cq", message={}),
                       NewMessage(stream="later", queue="cq", message={},
                                  not_before=store.now() + 3600)])
        [held] = store.claim(["cq"], 1, "c", 30)
        store.publish([NewMessage(stream="b", queue="cq", message={})])
        commits.clear()
        with executed_statements() as sent:
            done = store.claim_round([held.ref], ["cq"], 4, "c", 30, next_due=True)
        assert [m.stream for m in done.claimed] == ["b"] and done.next_due is not None
        verbs = [s.lstrip().split(None, 1)[0].upper() for s in sent]
        # nomination (WITH clock ...) and one statement of the writes: the
        # events, the claimed row's update, the acked row's delete (where
        # statements are prepared, the acked stream's read between them)
        read = ["SELECT"] if store.db.dialect.prepares else []
        assert verbs == ["WITH", *read, "WITH"], sent
        writes = sent[-1]
        assert [writes.count(verb) for verb in ("INSERT INTO", "UPDATE", "DELETE FROM")] == [
            1, 1, 1
        ], writes
        assert commits == ["off"]

        # A stream that moved since its claim (the task's result): the
        # nomination brings the events past the state held, and the ack is
        # decided on them, still without a read.
        [taken] = done.claimed
        store.execute("b", lc.Succeed(result={"status": "SUCCESS"}, claim=taken.claim))
        store.publish([NewMessage(stream="c", queue="cq", message={})])
        with executed_statements() as sent:
            done = store.claim_round([taken.ref], ["cq"], 4, "c", 30, next_due=True)
        assert [m.stream for m in done.claimed] == ["c"]
        verbs = [s.lstrip().split(None, 1)[0].upper() for s in sent]
        assert verbs == ["WITH", *read, "WITH"], sent
        assert [e.type for e in store.read_stream("b")] == [
            "Published", "Claimed", "Succeeded", "Acked"
        ]
        assert store.read_stream("b")[-1].event == lc.Acked(taken.delivery, taken.claim)

    def test_durable_commits_after_relaxed_and_rolled_back_ones(
        self, store, commits, autocommitted
    ):
        for relaxed in self.relaxed_work(store):
            for rollback_first in (False, True):
                relaxed()
                if rollback_first:  # a rollback must not make us forget anything
                    with pytest.raises(RuntimeError), store.transaction():
                        raise RuntimeError("roll back a durable transaction")
                for durable in self.durable_work(store):
                    commits.clear()
                    autocommitted.clear()
                    durable()
                    name = f"{durable.__name__} after {relaxed.__name__}"
                    # Its last commit: a transaction's, or its statements' own
                    # (a result: a read and a write that commit as they run).
                    last = commits[-1:] or sorted(set(autocommitted))
                    # A dead letter's claim before it is relaxed: its reject is not.
                    assert last == ["on"], (name, commits, autocommitted)


def test_a_broadcast_to_many_queues_is_one_insert(driver_db):
    """Transient messages are stored only for declared queues, and a broadcast to
    many (``celery control`` to every worker's pidbox) is one statement whatever
    their number, as a plain batched insert would be."""
    from celery_eventstore.storage import QueueInfo

    factory = make_factory(driver_db)
    store = next(factory)()
    queues = [f"w{n}.pidbox" for n in range(30)]
    for queue in queues[:-1]:  # the last one was swept a moment ago
        store.declare_queue(QueueInfo(queue, transient=True))
    inserts: list[tuple[str, bool]] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        statement = context.statement  # as built, before the store may prepare it
        if statement.lstrip().upper().startswith("INSERT"):
            inserts.append((statement, executemany))

    sa.event.listen(store.db.engine, "before_cursor_execute", record)
    try:
        store.put_transient([(queue, {"method": "ping"}, 0, None) for queue in queues])
    finally:
        sa.event.remove(store.db.engine, "before_cursor_execute", record)
    # One execution of one statement: not an executemany, which psycopg2 sends
    # as a round trip per row.
    assert [many for _, many in inserts] == [False], inserts
    assert [store.transient_size(queue) for queue in queues] == [1] * 29 + [0]
    next(factory, None)


def test_no_transient_message_outlives_its_swept_queue(driver_db):
    """A sweep and a broadcast to the queue it deletes, each caught half way by
    the other, with real transactions: whichever commits first, the message
    goes with its queue, never left behind for a queue that is gone (a worker's
    heartbeat to a monitor's idle event queue)."""
    import threading

    from storehelpers import FakeClock

    from celery_eventstore.storage import QueueInfo

    clock = FakeClock()
    factory = make_factory(driver_db)
    store = next(factory)(clock=clock)
    for queue in ("swept-first", "broadcast-first"):
        store.declare_queue(QueueInfo(queue, transient=True, expires=10))
    clock.advance(11)

    def in_thread(work):
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        thread.join(0.5)  # it waits for the other transaction's locks
        return thread

    # The sweep has deleted the queue and not committed; the broadcast comes.
    with store.engine.connect() as sweep:
        for statement in store.queries.forget_queue:
            sweep.execute(statement, {"queue": "swept-first"})
        thread = in_thread(lambda: store.put_transient([("swept-first", {"n": 1}, 0, None)]))
        sweep.commit()
    thread.join(10)
    assert store.transient_size("swept-first") == 0

    # The broadcast has inserted and not committed; the sweep comes.
    with store.engine.connect() as broadcast:
        broadcast.execute(store.queries.insert_transient, {
            "t_queue": ["broadcast-first"], "t_payload": [{"n": 2}], "t_priority": [0],
            "t_expires_at": [None],
        })
        thread = in_thread(store.sweep)
        broadcast.commit()
    thread.join(10)
    assert store.queue_info(["broadcast-first"]) == {}
    assert store.transient_size("broadcast-first") == 0
    next(factory, None)
