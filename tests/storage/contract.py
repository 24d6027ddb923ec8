"""The store contract: written once, run against every dialect.

A dialect's test module subclasses :class:`StoreContract` and provides a
``make_store`` fixture returning a factory of migrated stores on one fresh
database; several stores from one factory share it, like processes do.
"""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa
from storehelpers import executed_statements

from celery_eventstore import lifecycle as lc
from celery_eventstore.exceptions import (
    ConcurrencyConflict,
    CorruptStream,
    InvalidTransition,
    MessageTooLarge,
    SchemaMissing,
    SchemaOutdated,
)
from celery_eventstore.storage import (
    SCHEMA_VERSION,
    LogFilter,
    NewMessage,
    Outcome,
    TaskFilter,
)
from celery_eventstore.storage.routing import Binding, QueueInfo


def msg(stream, queue="q", **kw):
    return NewMessage(stream=stream, queue=queue, message={"body": stream}, **kw)


def types(store, stream):
    return [rec.type for rec in store.read_stream(stream)]


class StoreContract:
    @pytest.fixture
    def store(self, make_store, clock):
        return make_store(clock=clock)

    # -- schema --------------------------------------------------------------

    def test_migrate_is_versioned_and_idempotent(self, make_store):
        store = make_store(migrate=False)
        assert store.schema_version() == 0
        assert store.migrate() == list(range(1, SCHEMA_VERSION + 1))
        assert store.migrate() == []
        assert store.schema_version() == SCHEMA_VERSION

    def test_missing_schema_fails_loudly(self, make_store):
        store = make_store(migrate=False)
        with pytest.raises(SchemaMissing, match="migrate"):
            store.publish([msg("a")])

    def test_an_older_schema_is_reported_and_upgraded(self, make_store):
        store = make_store(migrate=False)
        assert store.migrate(to_version=1) == [1]
        with pytest.raises(SchemaOutdated, match="migrate"):
            store.check_schema()
        assert store.migrate() == list(range(2, SCHEMA_VERSION + 1))
        store.check_schema()

    def test_auto_migrate_creates_the_schema(self, make_store):
        store = make_store(migrate=False, auto_migrate=True)
        store.publish([msg("a")])
        assert store.queue_size("q") == 1

    def test_migration_sql_names_prefixed_tables(self, make_store):
        sql = make_store(migrate=False, table_prefix="app1_").migration_sql()
        assert "app1_events" in sql and "app1_messages" in sql

    def test_table_prefixes_keep_applications_apart(self, make_store):
        one = make_store(table_prefix="one_")
        two = make_store(table_prefix="two_")
        one.publish([msg("a")])
        assert one.queue_size("q") == 1
        assert two.queue_size("q") == 0
        assert two.claim(["q"], 10, "w", 30) == []

    # -- the log -------------------------------------------------------------

    def test_append_and_read_stream(self, store):
        published = lc.Published("d1", "q", {"b": 1})
        store.append("s", [published], expected_version=0)
        store.append("s", [lc.Discarded("d1", "purged")], expected_version=1)
        recorded = store.read_stream("s")
        assert [r.version for r in recorded] == [1, 2]
        assert recorded[0].event == published
        assert store.load("s").deliveries["d1"].status is lc.DeliveryStatus.DISCARDED

    def test_append_with_a_stale_expected_version_conflicts(self, store):
        store.append("s", [lc.Published("d1", "q", {})], expected_version=0)
        with pytest.raises(ConcurrencyConflict):
            store.append("s", [lc.Published("d2", "q", {})], expected_version=0)
        with pytest.raises(ConcurrencyConflict):
            store.append("s", [lc.Published("d2", "q", {})], expected_version=5)
        assert len(store.read_stream("s")) == 1

    def test_append_refuses_an_impossible_sequence(self, store):
        with pytest.raises(CorruptStream):
            store.append("s", [lc.Acked("nope", "c")], expected_version=0)
        assert store.read_stream("s") == []

    def test_read_all_is_in_log_order_from_a_position(self, store):
        store.publish([msg("a"), msg("b"), msg("c")])
        everything = store.read_all()
        positions = [r.position for r in everything]
        assert positions == sorted(positions) and len(positions) == 3
        assert [r.stream for r in store.read_all(after=positions[0])] == ["b", "c"]
        assert len(store.read_all(limit=2)) == 2

    def test_read_positions_returns_the_committed_events_at_those_positions(self, store):
        store.publish([msg("a"), msg("b"), msg("c")])
        a, b, c = store.read_all()
        got = store.read_positions([c.position, a.position, 10**9])
        assert [(r.position, r.stream) for r in got] == [(a.position, "a"), (c.position, "c")]
        assert store.read_positions([]) == []

    # -- publish, claim, ack ---------------------------------------------------

    def test_publish_claim_ack(self, store):
        (delivery,) = store.publish([msg("t1")])
        assert store.queue_size("q") == 1
        (claimed,) = store.claim(["q"], 10, "worker-1", 30)
        assert (claimed.delivery, claimed.stream, claimed.message) == (
            delivery, "t1", {"body": "t1"}
        )
        assert not claimed.redelivered
        assert store.queue_size("q") == 0
        assert store.ack([claimed.ref]) == {delivery: Outcome.DONE}
        assert types(store, "t1") == ["Published", "Claimed", "Acked"]
        assert store.projection_rows()[store.tables.messages.name] == []

    def test_publish_hinted_new_to_an_existing_stream_appends_after_it(self, store):
        # A wrong "new stream" hint costs a lost race and a re-read, never an event.
        (first,) = store.publish([msg("t1")])
        (claimed,) = store.claim(["q"], 1, "w", 30)
        store.ack([claimed.ref])
        (second,) = store.publish([NewMessage(stream="t1", queue="q", message={"body": "again"},
                                              new_stream=True)])
        assert types(store, "t1") == ["Published", "Claimed", "Acked", "Published"]
        assert [r.version for r in store.read_stream("t1")] == [1, 2, 3, 4]
        (again,) = store.claim(["q"], 1, "w", 30)
        assert (again.delivery, again.message) == (second, {"body": "again"})

    @pytest.mark.parametrize("new_stream", [True, False])
    def test_a_delivery_published_again_is_recorded_once(self, store, new_stream):
        """A producer retrying a publish it could not confirm sends the same
        delivery id: claimed or not by then, the store keeps one delivery."""
        again = msg("t1", delivery="d1", new_stream=new_stream)
        assert store.publish([again]) == ["d1"]
        (claimed,) = store.claim(["q"], 1, "w", 30)
        assert store.publish([again]) == ["d1"]
        assert types(store, "t1") == ["Published", "Claimed"]
        assert store.claim(["q"], 1, "w", 30) == []
        store.ack([claimed.ref])
        assert store.publish([again]) == ["d1"]
        assert types(store, "t1") == ["Published", "Claimed", "Acked"]
        with pytest.raises(InvalidTransition):
            store.publish([msg("t1", queue="other", delivery="d1")])

    def test_publish_hinted_new_inside_a_callers_transaction(self, store):
        store.publish([msg("t2")])
        with store.engine.connect() as conn:
            with conn.begin():
                store.publish(
                    [NewMessage(stream="t2", queue="q", message={"body": "x"}, new_stream=True),
                     NewMessage(stream="t3", queue="q", message={"body": "y"}, new_stream=True)],
                    connection=conn,
                )
        assert types(store, "t2") == ["Published", "Published"]
        assert types(store, "t3") == ["Published"]

    def test_claim_serves_highest_priority_then_oldest(self, store):
        store.publish([msg("low1", priority=1), msg("high", priority=9), msg("low2", priority=1)])
        store.publish([msg("mid", priority=5)])
        got = [m.stream for m in store.claim(["q"], 10, "w", 30)]
        assert got == ["high", "mid", "low1", "low2"]

    def test_claim_takes_at_most_the_limit_from_the_named_queues(self, store):
        store.publish([msg(f"a{i}", queue="a") for i in range(5)] + [msg("b0", queue="b")])
        store.publish([msg("c0", queue="c")])
        first = store.claim(["a", "b"], 4, "w", 30)
        assert len(first) == 4
        rest = store.claim(["a", "b"], 10, "w", 30)
        assert {m.stream for m in first + rest} == {"a0", "a1", "a2", "a3", "a4", "b0"}
        assert store.queue_size("c") == 1

    def test_scheduled_message_waits_until_due(self, store, clock):
        store.publish([msg("later", not_before=clock.now + 60)])
        assert store.claim(["q"], 10, "w", 30) == []
        clock.advance(59.9)
        assert store.claim(["q"], 10, "w", 30) == []
        clock.advance(0.1)
        assert [m.stream for m in store.claim(["q"], 10, "w", 30)] == ["later"]

    def test_earliest_due_is_the_next_eta_of_a_waiting_message_in_those_queues(
        self, store, clock
    ):
        now = clock.now
        assert store.earliest_due(["q"], now) is None
        store.publish([
            msg("ready"),
            msg("in-a-minute", not_before=now + 60),
            msg("in-ten", not_before=now + 10),
            msg("other-queue", queue="other", not_before=now + 5),
        ])
        assert store.earliest_due(["q"], now) == now + 10
        assert store.earliest_due(["q", "other"], now) == now + 5
        assert store.earliest_due(["q"], now + 10) == now + 60  # only later than that
        assert store.earliest_due(["nothing"], now) is None
        clock.advance(10)
        claimed = store.claim(["q"], 5, "w", 300)
        assert sorted(m.stream for m in claimed) == ["in-ten", "ready"]
        # A claimed message is no longer waiting, whatever its ETA was.
        assert store.earliest_due(["q"], now) == now + 60

    def test_a_claim_round_brings_the_next_eta_after_its_own_time(self, store, clock):
        """A consumer's round (acks, claim, next ETA) in one transaction: the next
        ETA is the earliest later than the time the round claimed at, so one that
        fell due by then is claimed, never reported as still to come."""
        now = clock.now
        store.publish([
            msg("ready"),
            msg("in-a-minute", not_before=now + 60),
            msg("in-ten", not_before=now + 10),
            msg("other-queue", queue="other", not_before=now + 5),
        ])
        first = store.claim_round([], ["q"], 5, "w", 300, next_due=True)
        assert [m.stream for m in first.claimed] == ["ready"]
        assert first.next_due == now + 10
        assert store.claim_round([], ["q", "other"], 5, "w", 300, next_due=True).next_due == (
            now + 5
        )
        assert store.claim_round([], ["q"], 5, "w", 300).next_due is None  # not asked
        clock.advance(10)
        second = store.claim_round(
            [m.ref for m in first.claimed], ["q"], 5, "w", 300, next_due=True
        )
        assert second.outcomes == {first.claimed[0].delivery: Outcome.DONE}
        assert [m.stream for m in second.claimed] == ["in-ten"]
        assert second.next_due == now + 60
        clock.advance(60)
        third = store.claim_round([], ["q"], 5, "w", 300, next_due=True)
        assert [m.stream for m in third.claimed] == ["in-a-minute"]
        assert third.next_due is None

    def test_a_claim_round_counts_what_it_settled_among_what_it_took_up(self, store, clock):
        """A round that settles the messages it nominated (here, expired) claims
        none of them, yet says it took up its whole limit: more may be waiting,
        and its consumer must not take the short round for an empty queue."""
        store.publish([msg("gone-1", expires=clock.now + 1), msg("gone-2", expires=clock.now + 1),
                       msg("waiting-1"), msg("waiting-2")])
        clock.advance(2)
        settling = store.claim_round([], ["q"], 2, "w", 300, next_due=True)
        assert settling.claimed == []
        assert settling.nominated == 2
        assert types(store, "gone-1") == ["Published", "Discarded"]
        claiming = store.claim_round([], ["q"], 5, "w", 300, next_due=True)
        assert sorted(m.stream for m in claiming.claimed) == ["waiting-1", "waiting-2"]
        assert claiming.nominated == 2
        assert store.claim_round([], ["q"], 5, "w", 300).nominated == 0

    def test_a_round_settles_its_claims_from_their_held_state_and_the_tail(
        self, make_store, clock, monkeypatch
    ):
        """A consumer's round settles the claims it made from the state each claim
        left, carried on by the events appended since (a result, another
        claimer's steal) -- read alone, not the whole streams -- and decides as a
        whole read would."""
        consumer, other = make_store(clock=clock), make_store(clock=clock)
        consumer.publish([msg("quiet"), msg("finished"), msg("stolen")])
        first = consumer.claim_round([], ["q"], 2, "w", 300)
        short = consumer.claim_round([], ["q"], 1, "w", 1)
        held = {m.stream: m for m in [*first.claimed, *short.claimed]}
        assert sorted(held) == ["finished", "quiet", "stolen"]
        other.execute("finished", lc.Succeed(result={"r": 1}, claim=held["finished"].claim))
        clock.advance(2)  # the short lease runs out: another consumer takes it
        [steal] = other.claim(["q"], 5, "thief", 300)
        assert steal.stream == "stolen"

        decoded = []
        recorded = consumer.deliveries.log.recorded
        monkeypatch.setattr(consumer.deliveries.log, "recorded",
                            lambda row: decoded.append(row.stream_id) or recorded(row))
        round_ = consumer.claim_round([m.ref for m in held.values()], ["q"], 5, "w", 300)

        assert round_.outcomes == {
            held["quiet"].delivery: Outcome.DONE,
            held["finished"].delivery: Outcome.DONE,
            held["stolen"].delivery: Outcome.STALE,
        }
        if consumer.deliveries.log.partitioned:  # a stream may have moved: read whole
            assert sorted(decoded) == ["finished"] * 3 + ["quiet"] * 2 + ["stolen"] * 4
        else:  # the tails only: the result, and the steal's two events
            assert sorted(decoded) == ["finished", "stolen", "stolen"]
        assert types(consumer, "quiet") == ["Published", "Claimed", "Acked"]
        assert types(consumer, "finished") == ["Published", "Claimed", "Succeeded", "Acked"]
        assert types(consumer, "stolen") == ["Published", "Claimed", "LeaseExpired", "Claimed"]
        assert other.ack([steal.ref]) == {steal.delivery: Outcome.DONE}

    def test_a_steady_round_reads_no_stream_and_decides_as_a_read_would(
        self, make_store, clock, monkeypatch
    ):
        """A consumer's round whose settled streams have not moved since their
        claims, and whose nominees are fresh (their publish is all their stream
        holds), folds them from what it holds and what the nomination brings:
        no stream is read, and every state is the one a whole read folds.  A
        stream that moved (another store's write) is read, unless the
        nomination brings its new events; one with more than its publish (a
        message published again to it) is read."""
        consumer, other = make_store(clock=clock), make_store(clock=clock)
        consumer.publish([msg("one"), msg("two")])
        [first] = consumer.claim_round([], ["q"], 1, "w", 300).claimed
        asked = []
        read_streams = consumer.deliveries.log.read_streams

        def reading(tx, streams, **kw):
            streams = list(streams)
            asked.append(sorted(streams))
            return read_streams(tx, streams, **kw)

        monkeypatch.setattr(consumer.deliveries.log, "read_streams", reading)

        round_ = consumer.claim_round([first.ref], ["q"], 5, "w", 300)
        [second] = round_.claimed
        assert round_.outcomes == {first.delivery: Outcome.DONE}
        partitioned = consumer.deliveries.log.partitioned
        # Where statements are prepared on the server, the settled streams are
        # read (see Queries._known_streams).
        prepares = consumer.db.dialect.prepares
        assert asked == ([["one", "two"]] if partitioned else [["one"]] if prepares else [[]])
        assert second.state == consumer.load("two")
        assert types(consumer, "one") == ["Published", "Claimed", "Acked"]

        # Another store moves the claimed stream; a message is published again
        # to the acked one: both are read, and decided as a read decides.
        other.deliveries.renew([second.ref], 300)
        consumer.publish([msg("one", delivery="again")])
        asked.clear()  # the publish read its stream
        round_ = consumer.claim_round([second.ref], ["q"], 5, "w", 300)
        assert round_.outcomes == {second.delivery: Outcome.DONE}
        [again] = round_.claimed
        if partitioned or not consumer.queries.tails_in_nomination:
            assert asked == [["one", "two"]]
        else:
            assert asked == [["one"]]
        assert again.delivery == "again" and again.state == consumer.load("one")
        assert types(consumer, "two") == ["Published", "Claimed", "LeaseRenewed", "Acked"]
        assert consumer.load("two").version == 4

    def test_a_plain_ack_reads_whole_streams(self, make_store, clock, monkeypatch):
        """Outside a consumer's round, settling reads the streams whole."""
        store = make_store(clock=clock)
        store.publish([msg("a")])
        claimed = store.claim_round([], ["q"], 1, "w", 300).claimed
        decoded = []
        recorded = store.deliveries.log.recorded
        monkeypatch.setattr(store.deliveries.log, "recorded",
                            lambda row: decoded.append(row.stream_id) or recorded(row))
        assert store.ack([m.ref for m in claimed]) == {claimed[0].delivery: Outcome.DONE}
        assert decoded == ["a", "a"]

    def test_a_result_decided_on_its_claims_state_is_the_one_a_read_decides(
        self, make_store, clock, monkeypatch
    ):
        """A worker's result write given the state its claim left: recorded as
        a read would record it -- the same events, results row and task row --
        with the recorded time of the database (or the test's) clock, never
        before the stream's last; after the worker's early ack and renewals;
        fenced out where the claim was taken over.  Where the database takes
        the write in one statement (PostgreSQL, log not partitioned), nothing
        of the stream is read unless something other than an ack or a renewal
        was appended since the claim."""
        store, other = make_store(clock=clock), make_store(clock=clock)
        store.publish([msg("quiet"), msg("acked"), msg("started"), msg("taken")])
        short = store.claim(["q"], 1, "w", 1)  # "quiet", oldest first
        rest = {m.stream: m for m in store.claim(["q"], 3, "w", 300)}
        held = {"quiet": short[0], **rest}
        assert sorted(held) == ["acked", "quiet", "started", "taken"]
        unread = store.db.dialect.writes_in_with and not store.log.partitioned
        decoded = []
        recorded = store.log.recorded
        monkeypatch.setattr(store.log, "recorded",
                            lambda row: decoded.append(row.stream_id) or recorded(row))
        clock.advance(0.5)

        [done] = store.execute("quiet", lc.Succeed(result={"r": 1}, claim=held["quiet"].claim),
                               known=held["quiet"].state)
        assert done.event == lc.Succeeded({"r": 1}, delivery=held["quiet"].delivery)
        assert done.version == 3
        assert done.recorded_at == clock.now
        assert done.recorded_at >= held["quiet"].state.recorded_until
        assert decoded == ([] if unread else ["quiet"] * 2)
        assert store.read_stream("quiet")[-1] == done
        assert store.results(["quiet"])["quiet"] == ("SUCCESS", {"r": 1}, done.recorded_at)
        assert store.tasks(TaskFilter(state="SUCCESS"))[0].task_id == "quiet"

        # Renewed and acked early since its claim (result-neutral): after them.
        store.renew([held["acked"].ref], 300)
        store.ack([held["acked"].ref])
        decoded.clear()
        [failed] = store.execute(
            "acked", lc.Fail(exc="E", result={"e": 1}, claim=held["acked"].claim),
            known=held["acked"].state,
        )
        assert ("acked" in decoded) != unread
        assert types(store, "acked") == ["Published", "Claimed", "LeaseRenewed", "Acked",
                                         "Failed"]
        assert failed == store.read_stream("acked")[-1] and failed.version == 5
        assert store.results(["acked"])["acked"][:2] == ("FAILURE", {"e": 1})

        # The stream moved on otherwise (its STARTED): read, then appended.
        store.execute("started", lc.Start(worker="w", claim=held["started"].claim))
        decoded.clear()
        store.execute("started", lc.Succeed(result={"r": 2}, claim=held["started"].claim),
                      known=held["started"].state)
        assert "started" in decoded
        assert types(store, "started") == ["Published", "Claimed", "Started", "Succeeded"]
        assert store.results(["started"])["started"][:2] == ("SUCCESS", {"r": 2})

        # Taken over by another worker: fenced out, whatever the claim's state said.
        clock.advance(300)
        [steal] = other.claim(["q"], 5, "thief", 300)
        assert steal.stream == "taken"
        [fenced] = store.execute(
            "taken", lc.Succeed(result={"r": 3}, claim=held["taken"].claim),
            known=held["taken"].state,
        )
        assert isinstance(fenced.event, lc.ResultFenced)
        assert store.results(["taken"]) == {}
        # A state from another stream is not used for this one.
        assert store.execute(
            "taken", lc.Succeed(result={"r": 4}, claim=steal.claim), known=held["quiet"].state
        )[0].event == lc.Succeeded({"r": 4}, delivery=steal.delivery)
        live = store.projection_rows()
        store.rebuild()
        assert store.projection_rows() == live

    def test_a_scheduled_publish_wakes_listeners_of_its_queue(self, make_store, clock):
        consumer, producer = make_store(), make_store()
        listener = consumer.listener()
        try:
            listener.poll()
            producer.publish([msg("later", queue="tasks", not_before=time.time() + 3600)])
            assert listener.wait(5) & {"tasks", "*"}
        finally:
            listener.close()

    def test_expired_message_is_never_delivered_and_the_history_says_so(self, store, clock):
        store.publish([msg("old", expires=clock.now + 10), msg("fresh")])
        clock.advance(11)
        assert [m.stream for m in store.claim(["q"], 10, "w", 30)] == ["fresh"]
        assert types(store, "old") == ["Published", "Discarded"]
        assert store.read_stream("old")[-1].event.reason == "expired"
        assert store.queue_size("q") == 0

    def test_several_deliveries_of_one_task_share_its_stream(self, store):
        store.publish([msg("task"), msg("task")])
        claimed = store.claim(["q"], 10, "w", 30)
        assert len(claimed) == 2 and {m.stream for m in claimed} == {"task"}
        store.ack([m.ref for m in claimed])
        assert types(store, "task").count("Acked") == 2

    def test_a_batch_publish_reports_the_positions_the_log_holds(self, store):
        """The positions an append reports (commit watchers, queue order) are the
        log's, for a batch of our own and one joined to a caller's transaction."""
        watched = []
        store.watch(watched.extend)
        store.publish([msg("w0")])
        store.publish([msg(f"w{i}") for i in range(1, 60)])
        with store.transaction() as conn:
            store.publish([msg(f"j{i}") for i in range(40)], connection=conn)
            store.publish([msg(f"w{i}") for i in range(10)], connection=conn)
        reported = {(r.stream, r.version): r.position for r in watched}
        logged = {(r.stream, r.version): r.position for r in store.read_all(limit=1000)}
        assert len(logged) == 110
        assert {k: v for k, v in reported.items() if k in logged} == {
            k: logged[k] for k in reported if k in logged
        }
        assert set(reported) <= set(logged)
        # The queue's order (by the positions the projection was given) is the
        # publishes' order, for the joined batches too.
        claimed = store.claim(["q"], 200, "w", 30)
        assert [m.stream for m in claimed] == (
            [f"w{i}" for i in range(60)] + [f"j{i}" for i in range(40)]
            + [f"w{i}" for i in range(10)]
        )

    def test_decisions_read_no_message_bodies_and_claims_deliver_them(self, store, clock):
        big = {"body": "x" * 65536, "headers": {"task": "t"}}
        store.publish([NewMessage(stream="t", queue="q", message=big), msg("u")])
        decoded = []
        recorded = store.log.recorded
        store.log.recorded = lambda row: decoded.append(recorded(row)) or decoded[-1]
        try:
            (first,) = store.claim(["q"], 1, "w1", 30)
            store.execute("t", lc.Start(worker="w1", claim=first.claim))
            clock.advance(30)  # the lease runs out: the body is delivered again
            (again,) = store.claim(["q"], 1, "w2", 30)
            store.execute("t", lc.Succeed({"r": 1}, claim=again.claim))
            assert store.ack([again.ref]) == {again.delivery: Outcome.DONE}
            (other,) = store.claim(["q"], 1, "w2", 30)
        finally:
            del store.log.recorded
        assert first.message == big and again.message == big and again.redelivered
        assert other.message == {"body": "u"}
        publishes = [r.event for r in decoded if isinstance(r.event, lc.Published)]
        assert publishes and {p.message for p in publishes} == {None}
        assert all(r.metadata is None for r in decoded)
        # What is shown keeps the body: the history reads it.
        assert store.read_stream("t")[0].event.message == big
        assert store.load("t").result == {"r": 1}

    # -- leases and fencing ----------------------------------------------------

    def test_expired_lease_is_claimable_again_and_marked_redelivered(self, store, clock):
        store.publish([msg("t")])
        (first,) = store.claim(["q"], 1, "w1", 30)
        assert store.claim(["q"], 1, "w2", 30) == []
        clock.advance(30)
        (second,) = store.claim(["q"], 1, "w2", 30)
        assert second.delivery == first.delivery and second.claim != first.claim
        assert second.redelivered
        assert types(store, "t") == ["Published", "Claimed", "LeaseExpired", "Claimed"]

    def test_stale_claim_writes_nothing_and_says_so(self, store, clock):
        store.publish([msg("t")])
        (first,) = store.claim(["q"], 1, "w1", 30)
        clock.advance(31)
        (second,) = store.claim(["q"], 1, "w2", 30)
        version = store.load("t").version
        assert store.ack([first.ref]) == {first.delivery: Outcome.STALE}
        assert store.renew([first.ref], 30) == {first.delivery: Outcome.STALE}
        assert store.reject([first.ref], requeue=True) == {first.delivery: Outcome.STALE}
        assert store.load("t").version == version
        assert store.ack([second.ref]) == {second.delivery: Outcome.DONE}
        # After settlement even the winner's renewal matches nothing: no resurrection.
        assert store.renew([second.ref], 30) == {second.delivery: Outcome.STALE}
        assert store.claim(["q"], 1, "w3", 30) == []

    def test_renewal_keeps_a_long_task_from_being_stolen(self, store, clock):
        store.publish([msg("long")])
        (held,) = store.claim(["q"], 1, "w1", 30)
        for _ in range(10):
            clock.advance(20)
            assert store.renew([held.ref], 30) == {held.delivery: Outcome.DONE}
            assert store.claim(["q"], 1, "thief", 30) == []
        assert store.ack([held.ref]) == {held.delivery: Outcome.DONE}

    def test_dead_letter_after_max_claims_lost(self, store, clock):
        store.publish([msg("crashy")])
        for _ in range(3):
            assert len(store.claim(["q"], 1, "w", 10, max_claims=3)) == 1
            store.execute("crashy", lc.Start("w"))  # it ran (task_track_started)
            clock.advance(10)
        assert store.claim(["q"], 1, "w", 10, max_claims=3) == []
        last = store.read_stream("crashy")[-1].event
        assert isinstance(last, lc.DeadLettered) and "3 runs" in last.reason
        assert store.results(["crashy"])["crashy"][:2] == ("FAILURE", None)
        (stats,) = store.queue_stats()
        assert (stats.queue, stats.dead, stats.ready, stats.claimed) == ("q", 1, 0, 0)
        dead = store.projection_rows()[store.tables.dead_letters.name]
        assert len(dead) == 1

    def test_leases_lost_before_a_start_spend_a_larger_budget(self, store, clock):
        """Messages prefetched beside a task that killed the worker never started."""
        store.publish([msg("innocent")])
        for _ in range(3 * 2):
            assert len(store.claim(["q"], 1, "w", 10, max_claims=2)) == 1
            clock.advance(10)
        assert store.claim(["q"], 1, "w", 10, max_claims=2) == []
        last = store.read_stream("innocent")[-1].event
        assert last == lc.DeadLettered(last.delivery, "lost its lease 6 times before it started")

    def test_a_finished_task_is_settled_when_its_lease_runs_out(self, store, clock):
        """The worker recorded the result, then died before its ack was written."""
        store.publish([msg("done")])
        (m,) = store.claim(["q"], 1, "w", 10)
        store.execute("done", lc.Succeed({"body": "1", "encoding": "utf-8"}))
        clock.advance(10)
        assert store.claim(["q"], 1, "w", 10) == []
        assert [r.event for r in store.read_stream("done")][-2:] == [
            lc.LeaseExpired(m.delivery, m.claim, started=True),
            lc.Discarded(m.delivery, "outcome recorded"),
        ]
        assert store.results(["done"])["done"][0] == "SUCCESS"
        assert store.queue_size("q") == 0
        live = store.projection_rows()
        store.rebuild()
        assert store.projection_rows() == live

    def test_a_result_from_a_claim_taken_over_is_fenced_out(self, store, clock):
        store.publish([msg("t")])
        (old,) = store.claim(["q"], 1, "w1", 10)
        clock.advance(10)
        (new,) = store.claim(["q"], 1, "w2", 10)  # the lease ran out: taken over
        store.execute("t", lc.Start("w2", claim=new.claim))
        fenced = store.execute("t", lc.Succeed({"body": "old"}, claim=old.claim))
        assert [r.event for r in fenced] == [lc.ResultFenced(old.delivery, old.claim, "SUCCESS")]
        assert store.results(["t"])["t"][0] == "STARTED"
        (ok,) = store.execute("t", lc.Succeed({"body": "new"}, claim=new.claim))
        assert ok.event == lc.Succeeded({"body": "new"}, delivery=new.delivery)
        assert store.results(["t"])["t"][:2] == ("SUCCESS", {"body": "new"})
        live = store.projection_rows()
        store.rebuild()
        assert store.projection_rows() == live

    def test_dead_letters_are_listed_retried_and_purged(self, store, clock):
        store.publish([msg("a", metadata={"task": "proj.a"}, expires=clock.now + 3600),
                       msg("b")])
        a, b = store.claim(["q"], 2, "w", 30)
        store.reject([a.ref, b.ref], requeue=False, reason="poison")
        letters = store.dead_letters()
        assert [(d.stream, d.reason) for d in letters] == [("a", "poison"), ("b", "poison")]
        again = store.retry_dead(a.delivery)
        assert [d.stream for d in store.dead_letters()] == ["b"]
        (claimed,) = store.claim(["q"], 5, "w", 30)
        assert (claimed.delivery, claimed.message) == (again, {"body": "a"})
        republished = [r for r in store.read_stream("a") if r.type == "Published"][-1]
        assert republished.metadata == {"task": "proj.a", "retry_of": a.delivery}
        assert republished.event.expires == clock.now + 3600
        assert store.purge_dead() == 1
        assert store.dead_letters() == []
        assert types(store, "b")[-1] == "DeadLetterPurged"
        live = store.projection_rows()
        store.rebuild()
        assert store.projection_rows() == live

    def test_reject_requeue_restore_and_dead_letter(self, store):
        store.publish([msg("a"), msg("b"), msg("c")])
        a, b, c = store.claim(["q"], 3, "w", 30)
        store.reject([a.ref], requeue=True)
        store.restore([b.ref])
        store.reject([c.ref], requeue=False, reason="bad payload")
        again = store.claim(["q"], 10, "w", 30)
        assert sorted(m.stream for m in again) == ["a", "b"]
        assert all(m.redelivered for m in again)
        assert store.load("b").deliveries[b.delivery].lost_claims == 0
        assert store.load("a").deliveries[a.delivery].lost_claims == 1
        assert store.read_stream("c")[-1].event == lc.DeadLettered(c.delivery, "bad payload")

    def test_requeues_count_towards_max_claims(self, store):
        """A requeue is a run that ended without an outcome (Celery requeues when the
        pool process died): a task that keeps doing that is dead-lettered."""
        store.publish([msg("a")])
        for _ in range(2):
            [m] = store.claim(["q"], 1, "w", 30, max_claims=2)
            store.reject([m.ref], requeue=True, reason="rejected and requeued")
        assert store.claim(["q"], 1, "w", 30, max_claims=2) == []
        assert [(d.stream, d.reason) for d in store.dead_letters()] == [
            ("a", "2 runs ended without an outcome (lease expired or requeued)")
        ]
        assert store.queue_size("q") == 0

    # -- atomic publish on the caller's transaction --------------------------------

    def test_publish_on_a_rolled_back_connection_leaves_nothing(self, store):
        with store.engine.connect() as conn:
            trans = conn.begin()
            store.publish([msg("ghost")], connection=conn)
            trans.rollback()
        assert store.read_stream("ghost") == []
        assert store.queue_size("q") == 0

    def test_publish_on_a_committed_connection_leaves_exactly_one(self, store):
        with store.engine.connect() as conn:
            with conn.begin():
                store.publish([msg("real")], connection=conn)
                # Not visible to others before the caller commits.
                assert store.queue_size("q") == 0 or store.dialect_name == "sqlite"
        assert types(store, "real") == ["Published"]
        assert store.queue_size("q") == 1

    def test_publish_in_a_rolled_back_savepoint_leaves_nothing(self, store):
        with store.engine.connect() as conn:
            with conn.begin():
                savepoint = conn.begin_nested()
                store.publish([msg("inner")], connection=conn)
                savepoint.rollback()
                store.publish([msg("outer")], connection=conn)
        assert store.read_stream("inner") == []
        assert types(store, "outer") == ["Published"]

    def test_publish_first_on_an_application_engine_then_rollback_leaves_nothing(self, store):
        # The application's own engine, without the store's connection set-up: the
        # publish is the first statement of the transaction.
        app_engine = sa.create_engine(store.url, **store.db.dialect.engine_options(store.url))
        try:
            with app_engine.connect() as conn:
                trans = conn.begin()
                store.publish([msg("first")], connection=conn)
                trans.rollback()
            assert store.read_stream("first") == []
            with app_engine.connect() as conn, conn.begin():
                store.publish([msg("kept")], connection=conn)
            assert types(store, "kept") == ["Published"]
        finally:
            app_engine.dispose()

    # -- limits and queues -----------------------------------------------------

    def test_oversized_message_is_refused_and_nothing_written(self, make_store):
        store = make_store(max_message_size=1000)
        big = NewMessage(stream="big", queue="q", message={"body": "x" * 2000})
        with pytest.raises(MessageTooLarge, match="max_message_size"):
            store.publish([msg("small"), big])
        assert store.read_all() == []

    def test_purge_discards_waiting_messages_only(self, store):
        store.publish([msg(f"m{i}") for i in range(7)])
        (held,) = store.claim(["q"], 1, "w", 30)
        assert store.purge("q") == 6
        assert store.queue_size("q") == 0
        assert store.ack([held.ref]) == {held.delivery: Outcome.DONE}
        assert types(store, "m1") == ["Published", "Discarded"]

    def test_queue_stats_counts_each_state(self, store, clock):
        store.publish([msg("r1"), msg("r2"), msg("s", not_before=clock.now + 100)])
        store.publish([msg("c")])
        store.claim(["q"], 1, "w", 30)
        (stats,) = store.queue_stats()
        assert (stats.ready, stats.scheduled, stats.claimed, stats.dead) == (2, 1, 1, 0)

    def test_queue_stats_ages_of_the_oldest_ready_and_in_flight(self, store, clock):
        store.publish([msg("old"), msg("due", not_before=clock.now + 50)])
        clock.advance(10)
        store.publish([msg("new")])
        (stats,) = store.queue_stats()
        assert (stats.ready, stats.oldest_ready_age, stats.oldest_lease_age) == (2, 10, None)
        (old,) = store.claim(["q"], 1, "w", 300)
        assert old.stream == "old"
        clock.advance(25)
        (stats,) = store.queue_stats()
        assert (stats.ready, stats.scheduled, stats.claimed) == (1, 1, 1)
        assert (stats.oldest_ready_age, stats.oldest_lease_age) == (25, 25)
        (new,) = store.claim(["q"], 1, "w", 300)
        (stats,) = store.queue_stats()
        assert (stats.ready, stats.oldest_ready_age, stats.oldest_lease_age) == (0, None, 25)
        clock.advance(25)
        store.renew([old.ref], 300)  # a renewal does not make a claim younger
        (stats,) = store.queue_stats()
        # "due" became claimable 10 s ago: it counts from its ETA, not from its publish.
        assert (stats.ready, stats.oldest_ready_age, stats.oldest_lease_age) == (1, 10, 50)
        store.ack([old.ref, new.ref])
        (stats,) = store.queue_stats()
        assert (stats.claimed, stats.oldest_lease_age) == (0, None)

    def test_revoke_discards_pending_and_future_deliveries(self, store):
        store.publish([msg("t")])
        store.revoke("t")
        assert store.claim(["q"], 10, "w", 30) == []
        store.publish([msg("t")])  # e.g. a retry published after the revoke
        assert store.claim(["q"], 10, "w", 30) == []
        assert types(store, "t") == ["Published", "Revoked", "Discarded", "Published", "Discarded"]
        assert store.load("t").result_state is lc.ResultState.REVOKED

    def test_results_are_events_and_success_is_final(self, store, clock):
        store.execute("t", lc.Start(worker="w1"))
        assert store.results(["t"])["t"][0] == "STARTED"
        store.execute("t", lc.Succeed(result={"body": "42"}))
        store.execute("t", lc.Fail(exc="late"))
        state = store.load("t")
        assert state.result_state is lc.ResultState.SUCCESS
        assert types(store, "t") == ["Started", "Succeeded"]
        assert store.results(["t", "unknown"]) == {"t": ("SUCCESS", {"body": "42"}, clock.now)}

    def test_forget_hides_the_result_but_keeps_the_history(self, store):
        store.execute("t", lc.Succeed(result={"body": "42"}))
        store.execute("t", lc.Forget())
        assert store.results(["t"]) == {}
        assert types(store, "t") == ["Succeeded", "Forgotten"]

    def test_expired_task_reports_revoked(self, store, clock):
        store.publish([msg("late", expires=clock.now + 1)])
        clock.advance(2)
        assert store.claim(["q"], 1, "w", 30) == []
        assert store.results(["late"])["late"][0] == "REVOKED"

    def test_chord_counter_completes_once(self, store):
        for part in ["a", "b", "a", "c", "b"]:
            store.execute("chord:g", lc.CountChordPart(part, "SUCCESS", 3))
        assert types(store, "chord:g") == [
            "ChordPartDone", "ChordPartDone", "ChordPartDone", "ChordCompleted"
        ]

    @pytest.mark.slow
    def test_a_chord_part_costs_the_same_at_part_one_and_part_ten_thousand(self, store):
        size, measured = 10_000, 20
        chord = "chord:big"

        def count(parts):
            """Statements sent and log rows decoded by counting each of ``parts``."""
            costs = []
            decoded = []
            recorded = store.log.recorded
            store.log.recorded = lambda row: decoded.append(row) or recorded(row)
            try:
                for part in parts:
                    decoded.clear()
                    with executed_statements() as sent:
                        store.execute(chord, lc.CountChordPart(part, "SUCCESS", size))
                    costs.append((len(sent), len(decoded)))
            finally:
                del store.log.recorded
            return costs

        first = count([f"p{i}" for i in range(measured)])
        # The middle of the chord, appended in bulk through the same projection.
        middle = [lc.ChordPartDone(f"p{i}", "SUCCESS") for i in range(measured, size - measured)]
        store.append(chord, middle, expected_version=measured)
        last = count([f"p{i}" for i in range(size - measured, size)])

        # The same statements and no row of the log read, at part 1 as at part 9,999;
        # the completing part writes one more event.
        assert set(first + last[:-1]) == {first[0]}, (first, last)
        assert first[0][1] == 0, "counting a part read the chord's stream"
        assert last[-1][0] <= first[0][0] + 1 and last[-1][1] == 0, last
        state = store.load(chord)
        assert state.counted == size and state.completed
        assert types(store, chord).count("ChordCompleted") == 1
        # A redelivered part after completion changes nothing, cheaply too.
        ((statements, decoded),) = count(["p0"])
        assert statements < first[0][0] and decoded == 0
        assert len(store.read_stream(chord)) == size + 1

    def test_a_chord_whose_read_model_lags_the_log_is_folded_once(self, store):
        for part in ["a", "b"]:
            store.execute("chord:g", lc.CountChordPart(part, "SUCCESS", 4))
        # As after an upgrade from a schema without the read model.
        with store.engine.begin() as conn:
            for table in (store.tables.chords, store.tables.chord_parts):
                conn.execute(table.delete())
        for part in ["a", "c", "b"]:
            store.execute("chord:g", lc.CountChordPart(part, "SUCCESS", 4))
        rows = store.projection_rows()
        assert rows[store.tables.chords.name] == [("chord:g", 3, 3, False)]
        assert [r[1] for r in rows[store.tables.chord_parts.name]] == ["a", "b", "c"]
        recorded = store.execute("chord:g", lc.CountChordPart("d", "SUCCESS", 4))
        assert [r.type for r in recorded] == ["ChordPartDone", "ChordCompleted"]

    def test_prune_deletes_old_finished_streams_only(self, store, clock):
        store.publish([msg("done"), msg("waiting")])
        (m,) = store.claim(["q"], 1, "w", 30)
        store.ack([m.ref])
        store.execute(m.stream, lc.Succeed(result={"body": "x"}))
        old = clock.now
        clock.advance(100)
        store.publish([msg("recent")])
        (r,) = [c for c in store.claim(["q"], 5, "w", 30) if c.stream == "recent"]
        store.ack([r.ref])
        assert store.prune(before=old + 1, batch=1) == 1
        assert store.read_stream(m.stream) == []
        assert store.results([m.stream]) == {}
        remaining = {"done", "waiting", "recent"} - {m.stream}
        assert all(store.read_stream(s) for s in remaining)
        # No derived table (task index, chords...) keeps a row of a pruned stream:
        # the projections are what a rebuild of the log that is left makes.
        pruned_rows = store.projection_rows()
        store.rebuild()
        assert pruned_rows == store.projection_rows()

    def test_prune_and_rebuild_report_progress(self, store, clock):
        store.publish([msg(f"m{i}") for i in range(5)])
        store.publish([msg("waiting")])
        for m in store.claim(["q"], 5, "w", 30):
            store.ack([m.ref])
        clock.advance(100)
        events = len(store.read_all(limit=100))
        calls = []
        store.rebuild(batch_streams=2, progress=lambda done, total: calls.append((done, total)))
        assert calls[-1] == (events, events) and len(calls) > 1
        assert [done for done, _ in calls] == sorted(done for done, _ in calls)
        calls.clear()
        pruned = store.prune(before=clock.now, batch=2, progress=lambda *a: calls.append(a))
        assert pruned == 5  # "waiting" is kept, but was examined
        assert calls == [(2, 6), (4, 6), (6, 6)]

    def test_expired_results_leave_the_backend_and_keep_their_history(self, store, clock):
        store.publish([msg("old", metadata={"task": "proj.add"}), msg("running")])
        store.execute("old", lc.Succeed(result={"body": "1"}))
        store.execute("failed", lc.Fail(exc="boom", result={"body": "2"}))
        store.execute("running", lc.Start(worker="w1"))
        store.execute("group:g", lc.SaveGroup(result={"body": "3"}))
        clock.advance(100)
        store.execute("recent", lc.Succeed(result={"body": "4"}))
        assert store.expire_results(before=clock.now - 50, batch=2) == 3
        assert set(store.results(["old", "failed", "running", "group:g", "recent"])) == {
            "running", "recent"
        }
        assert types(store, "old") == ["Published", "Succeeded", "ResultExpired"]
        assert types(store, "group:g") == ["GroupSaved", "ResultExpired"]
        # The index keeps what the history says; expiring again finds nothing.
        summaries = store.task_summaries(["old", "failed"])
        assert (summaries["old"].state, summaries["old"].name) == ("SUCCESS", "proj.add")
        assert summaries["failed"].state == "FAILURE"
        assert store.expire_results(before=clock.now + 1) == 1  # "recent" only
        assert store.prune(before=clock.now - 50) == 0  # history outlives its results

    # -- the task index ----------------------------------------------------------------

    def test_task_index_finds_tasks_by_each_field_newest_first(self, store, clock):
        def publish(task_id, name, queue="q", **links):
            store.publish([msg(task_id, queue, metadata={"task": name, **links})])
            clock.advance(1)

        publish("a1", "proj.add", root_id="a1")
        publish("a2", "proj.add", "other", parent_id="a1", root_id="a1", group="g1")
        publish("m1", "proj.mul", parent_id="a1", root_id="a1", group="g1")
        publish("m2", "proj.mul")
        store.publish([msg("plain")])  # a plain kombu message: no name
        for m in store.claim(["q", "other"], 10, "w", 30):
            if m.stream in ("a1", "a2"):
                store.execute(m.stream, lc.Start(worker="celery@alpha", claim=m.claim))
            if m.stream == "a1":
                store.execute(m.stream, lc.Succeed(result={"body": "1"}, claim=m.claim))
            if m.stream == "m1":
                store.reject([m.ref], requeue=False)  # dead letter: FAILURE
        store.revoke("m2")
        store.execute("a1", lc.Forget())  # the result goes, the index keeps SUCCESS

        def ids(**where):
            return [t.task_id for t in store.tasks(TaskFilter(**where), limit=10)]

        assert ids() == ["plain", "m2", "m1", "a2", "a1"]
        assert ids(name="proj.add") == ["a2", "a1"]
        assert ids(state="SUCCESS") == ["a1"] and ids(state="FAILURE") == ["m1"]
        assert ids(state="REVOKED") == ["m2"] and ids(state="STARTED") == ["a2"]
        assert ids(queue="other") == ["a2"]
        assert ids(worker="celery@alpha") == ["a2", "a1"]
        assert ids(parent_id="a1") == ["m1", "a2"]
        assert ids(root_id="a1") == ["m1", "a2", "a1"]
        assert ids(group_id="g1") == ["m1", "a2"]
        start = clock.now - 4  # a1's publish
        assert ids(since=start + 1, until=start + 2) == ["m1", "a2"]
        assert ids(name="proj.add", since=start + 1) == ["a2"]
        assert [t.task_id for t in store.tasks(limit=2)] == ["plain", "m2"]
        assert ids(name="x" * 1000) == [] and ids(worker="nul\x00") == []
        (a2,) = store.tasks(TaskFilter(queue="other"))
        assert (a2.name, a2.state, a2.worker, a2.parent_id, a2.group_id, a2.created_at) == (
            "proj.add", "STARTED", "celery@alpha", "a1", "g1", start + 1
        )

    def test_task_index_ties_are_ordered_by_id_and_results_alone_make_a_row(self, store, clock):
        store.publish([msg(t, metadata={"task": "x"}) for t in ("b", "c", "a")])
        store.execute("elsewhere", lc.Succeed(result={"body": "1"}))  # another broker
        assert [t.task_id for t in store.tasks()] == ["elsewhere", "c", "b", "a"]
        (row,) = store.tasks(TaskFilter(state="SUCCESS"))
        assert (row.task_id, row.name, row.queue) == ("elsewhere", None, None)
        assert "group:g" not in store.task_summaries(["group:g"])

    def test_task_index_is_rebuilt_from_the_log(self, store, clock):
        for i in range(6):
            store.publish([msg(f"t{i}", metadata={"task": f"n{i % 2}", "group": "g"})])
            clock.advance(1)
        for m in store.claim(["q"], 4, "w", 30):
            store.execute(m.stream, lc.Start(worker="w1", claim=m.claim))
            store.execute(m.stream, lc.Fail(exc="boom", claim=m.claim))
            store.ack([m.ref])
        store.execute("t5", lc.UpdateState(state="PROGRESS"))
        live = store.projection_rows()[store.tables.tasks.name]
        assert len(live) == 6
        store.tables.tasks.drop(store.engine)
        store.rebuild(batch_streams=4)
        assert store.projection_rows()[store.tables.tasks.name] == live
        assert store.task_summaries(["t5"])["t5"].state == "PROGRESS"

    # -- reading the log ---------------------------------------------------------------

    def test_read_log_by_type_task_queue_and_time_from_either_end(self, store, clock):
        for i in range(6):
            queue = "q" if i % 2 else "other"
            store.publish([msg(f"t{i}", queue, metadata={"task": f"n{i % 3}"})])
            clock.advance(10)
        for m in store.claim(["q", "other"], 10, "w", 30):
            store.ack([m.ref])
        everything = store.read_all(limit=100)
        last = everything[-1].position

        def streams(where, **kw):
            return [(r.stream, r.type) for r in store.read_log(where, **kw)]

        newest = store.read_log(LogFilter(), newest_first=True, limit=3)
        assert newest == everything[::-1][:3]
        assert store.read_log(LogFilter(), before=everything[2].position) == everything[:2]
        assert [r.type for r in store.read_log(LogFilter(types=("Acked",)))] == ["Acked"] * 6
        assert {s for s, _ in streams(LogFilter(name="n1"))} == {"t1", "t4"}
        assert {s for s, _ in streams(LogFilter(queue="q", types=("Published",)))} == {
            "t1", "t3", "t5"
        }
        start = everything[0].recorded_at
        assert streams(LogFilter(since=start + 10, until=start + 25)) == [
            ("t1", "Published"), ("t2", "Published")
        ]
        assert streams(LogFilter(until=start + 15), newest_first=True, limit=1) == [
            ("t1", "Published")
        ]
        assert store.read_log(LogFilter(since=clock.now + 1)) == []
        assert store.read_log(LogFilter(until=start - 1)) == []
        assert store.read_log(LogFilter(), after=last) == []
        assert store.read_log(LogFilter(queue="x" * 1000)) == []
        assert store.read_log(LogFilter(name="nul\x00")) == []

    # -- rebuild -------------------------------------------------------------------

    def test_rebuild_reproduces_the_live_projections(self, store, clock):
        store.publish([msg(f"m{i}", priority=i % 3) for i in range(20)])
        store.publish([msg("later", not_before=clock.now + 500), msg("t", expires=clock.now + 1)])
        claimed = store.claim(["q"], 8, "w1", 30)
        store.ack([m.ref for m in claimed[:3]])
        store.reject([claimed[3].ref], requeue=True)
        store.reject([claimed[4].ref], requeue=False)
        store.renew([claimed[5].ref], 60)
        clock.advance(40)
        store.claim(["q"], 3, "w2", 30, max_claims=1)
        store.revoke("m19")
        store.execute("m0", lc.Start(worker="w1"))
        store.execute("m0", lc.Succeed(result={"body": "1"}))
        store.execute("m1", lc.Fail(exc="boom", result={"body": "2"}))
        store.execute("m1", lc.Forget())
        store.execute("group:g", lc.SaveGroup(result={"body": "3"}))
        for part in ["m0", "m1", "m0", "m2"]:
            store.execute("chord:g", lc.CountChordPart(part, "SUCCESS", 3))
        store.execute("chord:h", lc.CountChordPart("m3", "FAILURE", 2))
        live = store.projection_rows()
        results = {row[0]: row[1] for row in live[store.tables.results.name]}
        assert {"m0": "SUCCESS", "m19": "REVOKED", "group:g": "SUCCESS"}.items() <= results.items()
        assert "m1" not in results  # forgotten
        assert "FAILURE" in results.values()  # the dead letters
        assert live[store.tables.messages.name] and live[store.tables.dead_letters.name]
        assert live[store.tables.chords.name] == [
            ("chord:g", 4, 3, True), ("chord:h", 1, 1, False)
        ]
        assert len(live[store.tables.chord_parts.name]) == 4

        # Drop the derived tables outright; the log alone must bring them back.
        for table in store.tables.projections:
            table.drop(store.engine)
        store.rebuild(batch_streams=3)  # several batches while the log is streamed
        assert store.projection_rows() == live

    # -- errors ----------------------------------------------------------------------

    def test_claim_with_nothing_to_do(self, store):
        assert store.claim(["q"], 10, "w", 30) == []
        assert store.claim([], 10, "w", 30) == []
        assert store.claim(["q"], 0, "w", 30) == []

    def test_unknown_or_settled_delivery_cannot_be_settled(self, store):
        store.publish([msg("t")])
        (m,) = store.claim(["q"], 1, "w", 30)
        store.ack([m.ref])
        assert store.ack([m.ref]) == {m.delivery: Outcome.STALE}
        bogus = type(m.ref)("t", "no-such-delivery", "c")
        assert store.ack([bogus]) == {"no-such-delivery": Outcome.STALE}

    def test_store_never_parses_the_message_body(self, store):
        body = {"body": "gASVAAAA", "content-encoding": "binary", "headers": {"id": "x"}}
        store.publish([NewMessage(stream="x", queue="q", message=body)])
        (m,) = store.claim(["q"], 1, "w", 30)
        assert m.message == body

    def test_engine_reports_the_dialect(self, store):
        assert store.dialect_name == sa.make_url(str(store.url)).get_backend_name()

    # -- routing state ---------------------------------------------------------------

    def test_bindings_are_shared_between_stores(self, make_store):
        one, two = make_store(), make_store()
        one.bind(Binding("celery.pidbox", "w1.pidbox", "", None, "fanout"))
        one.bind(Binding("celery.pidbox", "w1.pidbox", "", None, "fanout"))  # idempotent
        two.bind(Binding("celery.pidbox", "w2.pidbox", "", None, "fanout"))
        assert [b.queue for b in one.bindings("celery.pidbox")] == ["w1.pidbox", "w2.pidbox"]
        two.unbind("celery.pidbox", "w1.pidbox", "")
        assert [b.queue for b in one.bindings("celery.pidbox")] == ["w2.pidbox"]

    def test_transient_messages_stay_out_of_the_log(self, store, clock):
        store.declare_queue(QueueInfo("reply", transient=True, expires=10, message_ttl=5))
        store.put_transient([("reply", {"n": 1}, 0, None), ("reply", {"n": 2}, 5, None),
                             ("reply", {"n": 3}, 0, clock.now + 1)])
        assert store.transient_size("reply") == 3
        clock.advance(2)
        got = store.take_transient(["reply"], 10)
        assert [p["n"] for _, p in got] == [2, 1]  # highest priority first; n=3 expired
        assert store.take_transient(["reply"], 10) == []
        assert store.read_all() == []

    def test_idle_transient_queue_is_swept_with_its_bindings(self, store, clock):
        store.declare_queue(QueueInfo("gone", transient=True, expires=10))
        store.declare_queue(QueueInfo("alive", transient=True, expires=10))
        store.bind(Binding("celery.pidbox", "gone", "", None, "fanout"))
        store.put_transient([("gone", {"n": 1}, 0, None)])
        clock.advance(8)
        store.touch_queues(["alive"])
        clock.advance(3)
        assert store.sweep() == 1
        assert store.queue_info(["gone", "alive"]).keys() == {"alive"}
        assert store.bindings("celery.pidbox") == []
        assert store.transient_size("gone") == 0

    def test_a_transient_message_for_a_queue_not_declared_is_dropped(self, store, clock):
        # A worker's heartbeat routed by a binding cached from before the sweep.
        store.declare_queue(QueueInfo("swept", transient=True, expires=10))
        clock.advance(11)
        assert store.sweep() == 1
        store.declare_queue(QueueInfo("kept", transient=True))
        store.put_transient([("swept", {"n": 1}, 0, None), ("kept", {"n": 2}, 0, None)])
        assert store.transient_size("swept") == 0
        assert [p for _, p in store.take_transient(["swept", "kept"], 10)] == [{"n": 2}]

    def test_queue_exists_when_declared_or_holding_messages(self, store):
        assert not store.queue_exists("q")
        store.publish([msg("a")])
        assert store.queue_exists("q")
        store.declare_queue(QueueInfo("declared", transient=False))
        assert store.queue_exists("declared")

    def test_listener_wakes_on_publish_from_another_store(self, make_store):
        consumer, producer = make_store(), make_store()
        listener = consumer.listener()
        try:
            listener.poll()
            assert listener.wait(0.05) == set()
            producer.publish([msg("wake", queue="tasks")])
            woken = listener.wait(5)
            assert woken & {"tasks", "*"}
        finally:
            listener.close()

    def test_ack_and_claim_in_one_transaction(self, store):
        store.publish([msg("a"), msg("b"), msg("c")])
        first = store.claim(["q"], 2, "w", 30)
        outcomes, more = store.ack_and_claim([m.ref for m in first], ["q"], 5, "w", 30)
        assert set(outcomes.values()) == {Outcome.DONE}
        assert [m.stream for m in more] == ["c"]
        assert all(types(store, m.stream) == ["Published", "Claimed", "Acked"] for m in first)
        # One task's two deliveries: ack the first and claim the second together.
        store.publish([msg("task")])
        (d1,) = store.claim(["q"], 1, "w", 30)
        store.publish([msg("task")])
        outcomes, (d2,) = store.ack_and_claim([d1.ref], ["q"], 5, "w", 30)
        assert outcomes == {d1.delivery: Outcome.DONE} and d2.stream == "task"
        assert types(store, "task") == ["Published", "Claimed", "Published", "Acked", "Claimed"]
        live = store.projection_rows()
        store.rebuild()
        assert store.projection_rows() == live
