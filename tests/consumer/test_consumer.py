"""The consumer's bookkeeping (celery_eventstore.consumer) against a real store,
without worker processes: the test turns the event loop by hand, so each race is
played in the order it chooses.  Claims run on the transport's claimer thread,
acks and claims are real transactions, and what they wrote is read back from the
event log."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kombu
import pytest
import sqlalchemy as sa
from consumerrig import QUEUE, QUIET, Rig, TcpProxy, wait_for
from kombu import Message

from celery_eventstore.storage import EventStore

STALE = "came too late"


def no_stale_writes(caplog: pytest.LogCaptureFixture) -> None:
    """An ack written twice, or a renewal after an ack, is reported as stale."""
    assert not [r for r in caplog.records if STALE in r.getMessage()]


# -- acks and claims -----------------------------------------------------------


def test_a_claim_writes_the_acks_buffered_before_it_and_keeps_those_that_come_during_it(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(prefetch=2)
    ids = rig.publish(4)
    rig.claim_cycle()
    first, second = rig.delivered
    assert rig.ids() == ids[:2]

    first.ack()
    assert rig.count(ids[0], "Acked") == 0, "an ack waits for the next claim"
    assert rig.qos.credit() == 1

    rig.poller.on_tick()  # half the window is free and a backlog waits: claim
    assert rig.claim_finished()
    # The claim wrote the first ack in its transaction; the second comes while
    # the claim is in flight and waits in the buffer for the next write.
    second.ack()
    assert rig.count(ids[0], "Acked") == 1
    assert rig.count(ids[1], "Acked") == 0
    assert ids[2] in [e.stream for e in rig.log.read_all() if e.type == "Claimed"]

    # Delivering the third frees half the window again (the second was acked):
    # the next claim starts, with the second ack.
    rig.poller.on_claimed()
    assert rig.ids() == ids[:3]
    assert rig.claim_finished()
    assert [rig.count(i, "Acked") for i in ids] == [1, 1, 0, 0]
    rig.poller.on_claimed()
    assert rig.ids() == ids
    for message in rig.unacked():
        message.ack()
    rig.qos.flush_acks()
    assert [rig.count(i, "Acked") for i in ids] == [1, 1, 1, 1]
    assert rig.qos.credit() == 2
    no_stale_writes(caplog)


@pytest.mark.parametrize("credit_left", [False, True], ids=["claim-took-all-credit", "credit-left"])
def test_a_wake_up_during_a_claim_is_not_lost(
    make_rig: Callable[..., Rig], credit_left: bool
) -> None:
    rig = make_rig(prefetch=4)
    if credit_left:
        rig.publish(1)
        rig.claim_cycle()  # one message held: the next claim asks for 3 of 4
    first = rig.publish(1)
    rig.wake()
    assert rig.claim_finished()  # it nominated before the next message existed

    late = rig.publish(1)
    if credit_left:
        rig.delivered[0].ack()  # credit frees while the claim is in flight
    rig.wake()  # its wake-up comes while the loop has not taken the claim yet
    rig.poller.on_claimed()
    assert rig.ids()[-1:] == first

    # No safety-net poll runs: only the remembered wake-up can claim it now.
    assert rig.claim_finished(timeout=2), "the wake-up was lost"
    rig.poller.on_claimed()
    assert rig.ids()[-1:] == late


def test_credit_never_goes_negative_nor_leaks(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    """A random walk of publishes, claims that bring fewer than asked, acks and
    requeues: the credit is always the window less what is held and what the
    claim in flight may bring."""
    prefetch = 5
    rig = make_rig(prefetch=prefetch)
    rnd = random.Random(9)
    published: list[str] = []
    acked: set[str] = set()

    def check() -> None:
        credit, held, in_flight = rig.qos.credit(), len(rig.unacked()), rig.qos._claiming
        assert 0 <= credit == prefetch - held - in_flight, (credit, held, in_flight)

    def settle(message: Message, step: str) -> None:
        if step == "ack":
            message.ack()
            acked.add(message.headers["id"])
        else:
            message.reject(requeue=True)

    for _ in range(60):
        step = rnd.choice(["publish", "claim", "claim", "ack", "ack", "requeue"])
        if step == "publish":
            published += rig.publish(rnd.randint(0, 3))
        elif step == "claim":
            rig.wake()
            if rig.claim_finished(timeout=0.5):
                rig.poller.on_claimed()
        elif rig.unacked():
            settle(rnd.choice(rig.unacked()), step)
        check()

    # Drain: everything published is acked once, and the whole window is back.
    deadline = time.monotonic() + 60
    while set(published) - acked and time.monotonic() < deadline:
        for message in rig.unacked():
            settle(message, "ack")
        rig.wake()
        if rig.claim_finished(timeout=1):
            rig.poller.on_claimed()
        check()
    assert not set(published) - acked
    rig.qos.flush_acks()
    assert rig.qos.credit() == prefetch
    assert not rig.qos._held
    for task_id in published:
        assert rig.count(task_id, "Acked") == 1, rig.types(task_id)
    no_stale_writes(caplog)


def test_acks_from_any_thread_are_written_once_whoever_writes_them(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    """Pool threads ack (flushing a full buffer themselves), the claimer writes
    acks with its claims and the keeper flushes old ones, all at once."""
    rig = make_rig(prefetch=8, ack_flush_interval=0.005, claim_batch=4)
    ids = rig.publish(120)
    pool = ThreadPoolExecutor(4, thread_name_prefix="pool")
    acked: list[Message] = []
    seen = 0

    def run(message: Message) -> None:
        time.sleep(random.random() / 500)
        message.ack()
        acked.append(message)

    rig.hub.call_soon(rig.poller.on_wake)
    deadline = time.monotonic() + 60
    while len(acked) < len(ids) and time.monotonic() < deadline:
        rig.hub.run_once(timeout=0.005)
        for message in rig.delivered[seen:]:
            pool.submit(run, message)
        seen = len(rig.delivered)
    pool.shutdown()
    assert sorted(rig.ids()) == sorted(ids)
    wait_for(lambda: all(rig.count(i, "Acked") for i in ids), 10, "the keeper's last flush")
    assert [rig.count(i, "Acked") for i in ids] == [1] * len(ids)
    assert not rig.qos._held
    no_stale_writes(caplog)


# -- leases --------------------------------------------------------------------


def test_only_held_claims_past_half_their_lease_are_renewed(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(prefetch=2, visibility_timeout=2.0)
    done, running = rig.publish(2)
    rig.claim_cycle()

    rig.qos.renew_leases()
    assert rig.count(running, "LeaseRenewed") == 0, "a fresh lease is left alone"
    time.sleep(1.1)
    rig.qos.renew_leases()
    assert rig.count(done, "LeaseRenewed") == rig.count(running, "LeaseRenewed") == 1

    rig.delivered[0].ack()  # buffered, not written: but no longer held
    time.sleep(1.1)
    rig.qos.renew_leases()
    assert rig.count(running, "LeaseRenewed") == 2
    assert rig.count(done, "LeaseRenewed") == 1
    rig.qos.flush_acks()
    assert rig.types(done)[-1] == "Acked"
    no_stale_writes(caplog)


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_a_host_clock_step_back_does_not_delay_a_renewal(
    make_rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keeper asks for renewals by the monotonic clock: a wall clock stepped back
    a minute while the task runs (issue 10, item 2) must not let its lease lapse."""
    rig = make_rig(prefetch=1, visibility_timeout=2.0)
    [running] = rig.publish(1)
    rig.claim_cycle()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 60)
    rig.log.now()  # the store's estimate of the database clock is not due for a re-measure
    time.sleep(1.1)
    rig.qos.renew_leases()
    assert rig.count(running, "LeaseRenewed") == 1


def test_a_lease_taken_over_is_reported_once_and_not_renewed_again(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(prefetch=1, visibility_timeout=1.0)
    [task] = rig.publish(1)
    rig.claim_cycle()
    time.sleep(1.1)  # the lease runs out; another consumer takes the message
    thief = EventStore(rig.url, schema=rig.options.get("schema"))
    assert [m.stream for m in thief.claim([QUEUE], 1, "thief", 60)] == [task]
    for _ in range(3):  # the keeper's next rounds
        rig.qos.renew_leases()
    rig.delivered[0].ack()
    rig.qos.flush_acks()

    warnings = [r for r in caplog.records if STALE in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert rig.count(task, "LeaseRenewed") == 0
    assert rig.count(task, "Acked") == 0  # fenced: the thief's claim stands


def test_an_ack_during_a_renewal_is_not_undone_by_it(
    make_rig: Callable[..., Rig], db: tuple[str, dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The renewal picks its claims under the lock, then writes without it: a
    message acked meanwhile must not come back into the held claims.  (A write lock
    held by the test parks the renewal for as long as it likes: SQLite's database
    lock, or on PostgreSQL a lock on the log.)"""
    rig = make_rig(prefetch=2, visibility_timeout=2.0)
    rig.publish(2)
    rig.claim_cycle()
    acked, running = rig.delivered
    time.sleep(1.1)  # both leases past half: both due
    blocker = EventStore(db[0], **db[1])
    try:
        with blocker.transaction() as conn:
            if blocker.dialect_name == "postgresql":
                events = conn.dialect.identifier_preparer.format_table(blocker.tables.events)
                conn.exec_driver_sql(f"LOCK TABLE {events} IN EXCLUSIVE MODE")
            renewal = threading.Thread(target=rig.qos.renew_leases)
            renewal.start()
            renewal.join(0.3)
            assert renewal.is_alive(), "the renewal should be waiting for the write lock"
            acked.ack()
        renewal.join(10)
    finally:
        blocker.close()
    assert list(rig.qos._held) == [running.delivery_tag]
    rig.qos.flush_acks()
    assert rig.types(acked.headers["id"])[-2:] == ["LeaseRenewed", "Acked"]
    no_stale_writes(caplog)


# -- closing -------------------------------------------------------------------


def test_closing_with_a_claim_in_flight_gives_everything_back(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(prefetch=2)
    ids = rig.publish(5)
    rig.claim_cycle()
    rig.delivered[0].ack()
    rig.poller.on_tick()  # claims the third with the first's ack...
    assert rig.claim_finished()
    rig.connection.close()  # ...and closes before the loop delivers it
    stats = {s.queue: s for s in rig.log.queue_stats()}[QUEUE]
    assert (stats.claimed, stats.ready) == (0, 4)
    assert rig.types(ids[0])[-1] == "Acked"
    assert rig.types(ids[1])[-1] == rig.types(ids[2])[-1] == "Requeued"
    assert rig.hub.readers == {} and not rig.hub.on_tick
    assert all(timer.cancelled for timer in rig.hub.timers)


# -- rounds that settle what they took up ----------------------------------------


def test_a_round_that_settles_all_it_took_up_claims_again_at_once(
    make_rig: Callable[..., Rig],
) -> None:
    """Expired messages at the head of the queue fill the first round's limit
    and are discarded by it: it brings nothing, yet the consumer claims again
    at once for the messages behind them -- no wake-up, no poll (QUIET)."""
    rig = make_rig(prefetch=2)
    expired = rig.publish(2, expiration=0.2)
    waiting = rig.publish(2)
    time.sleep(0.5)
    rig.claim_cycle()
    assert rig.delivered == []
    assert [rig.types(i) for i in expired] == [["Published", "Discarded"]] * 2
    assert rig.claim_finished(timeout=2), "the consumer waits while messages are ready"
    rig.poller.on_claimed()
    assert rig.ids() == waiting


@pytest.mark.parametrize("get", ["drain_events", "basic_get"])
def test_a_blocking_consumer_looks_past_messages_a_round_settles(
    db: tuple[str, dict[str, Any]], get: str
) -> None:
    """kombu's own loop (``drain_events``) and ``basic_get`` behind a run of
    expired messages longer than a round: the message behind them comes in
    one call, not Empty."""
    with kombu.Connection(f"eventstore+{db[0]}", transport_options={**db[1], **QUIET}) as conn:
        queue = kombu.Queue(QUEUE, routing_key=QUEUE)
        producer = conn.Producer()
        for number in range(7):
            producer.publish({"n": number}, routing_key=QUEUE, declare=[queue], expiration=0.2)
        time.sleep(0.5)
        producer.publish({"n": "fresh"}, routing_key=QUEUE)
        if get == "basic_get":
            message = queue(conn.channel()).get(no_ack=True)
            assert message is not None and message.payload == {"n": "fresh"}
            return
        got: list[Any] = []
        with conn.Consumer(queue, callbacks=[lambda body, m: (got.append(body), m.ack())],
                           prefetch_count=2):
            conn.drain_events(timeout=0.001)
        assert got == [{"n": "fresh"}]


# -- a lost connection (PostgreSQL, through a proxy the test cuts) -------------


@pytest.fixture
def proxied_rig(postgresql_db: tuple[str, dict[str, Any]]) -> Any:
    url, options = postgresql_db
    target = sa.make_url(url)
    proxy = TcpProxy((target.host or "127.0.0.1", target.port or 5432))
    proxy.start()
    rig = Rig(proxy.url(url), {**options, **QUIET}, prefetch=2)
    rig.log = EventStore(url, **options)  # read past the proxy
    try:
        yield rig, proxy
    finally:
        proxy.restore()
        try:
            rig.close()
        finally:
            rig.log.close()
            proxy.stop()


def test_acks_pending_when_the_connection_is_lost_are_written_once_it_is_back(
    proxied_rig: tuple[Rig, TcpProxy], caplog: pytest.LogCaptureFixture
) -> None:
    rig, proxy = proxied_rig
    ids = rig.publish(4)
    rig.claim_cycle()
    for message in rig.delivered:
        message.ack()

    proxy.cut()
    rig.poller.on_tick()  # the window is free and a backlog waits: claim
    assert rig.claim_finished()
    with pytest.raises(rig.transport.connection_errors):
        rig.poller.on_claimed()  # the loop sees the error: Celery would reconnect
    with pytest.raises(rig.transport.connection_errors):
        rig.qos.flush_acks()  # the keeper's try, as the database is still away
    assert [rig.count(i, "Acked") for i in ids[:2]] == [0, 0]
    assert rig.qos.credit() == 2, "a failed claim gives its credit back"

    proxy.restore()
    rig.poller.on_tick()  # the backlog is still due: the same consumer goes on
    rig.take_claim()
    assert rig.ids() == ids[:4]
    assert [rig.count(i, "Acked") for i in ids[:2]] == [1, 1]
    for message in rig.unacked():
        message.ack()
    rig.qos.flush_acks()
    assert [rig.count(i, "Acked") for i in ids] == [1, 1, 1, 1]
    no_stale_writes(caplog)


def test_acks_a_closing_channel_cannot_write_are_written_by_the_next_connection(
    proxied_rig: tuple[Rig, TcpProxy], caplog: pytest.LogCaptureFixture
) -> None:
    rig, proxy = proxied_rig
    ids = rig.publish(2)
    rig.claim_cycle()
    for message in rig.delivered:
        message.ack()  # buffered: QUIET leaves them to the next claim

    proxy.cut()
    rig.connection.close()  # Celery reconnects by closing and connecting again
    assert "the next connection writes them" in caplog.text
    assert [rig.count(i, "Acked") for i in ids] == [0, 0]

    proxy.restore()
    again = Rig(rig.url, rig.options, prefetch=2)  # the same store, as in a worker
    try:
        again.claim_cycle()  # its first round writes them
        assert [rig.count(i, "Acked") for i in ids] == [1, 1]
        assert [rig.count(i, "LeaseExpired") for i in ids] == [0, 0]
    finally:
        again.close()
    no_stale_writes(caplog)


@pytest.mark.parametrize("closing", ["channel", "connection"])
def test_a_round_in_flight_when_the_channel_closes_keeps_its_acks(
    proxied_rig: tuple[Rig, TcpProxy], caplog: pytest.LogCaptureFixture, closing: str
) -> None:
    """Celery closes its connection (to reconnect, or to shut down) whatever the
    claimer is doing, the consuming channel first (its default channel).  A claim
    round in flight carries the buffered acks; should it fail after the close
    began, it puts them back in the channel's buffer -- so the closing channel
    waits for it, then writes them or leaves them to the next connection.  (A
    lock on the log parks the round.)"""
    rig, proxy = proxied_rig
    ids = rig.publish(3)
    rig.claim_cycle()
    rig.delivered[0].ack()  # buffered: QUIET leaves it to the next round
    blocker = rig.log  # past the proxy
    with blocker.transaction() as conn:
        events = conn.dialect.identifier_preparer.format_table(blocker.tables.events)
        conn.exec_driver_sql(f"LOCK TABLE {events} IN EXCLUSIVE MODE")
        rig.poller.on_tick()  # a round with the ack, waiting for the lock
        assert not rig.claim_finished(timeout=0.3)
        closer = threading.Thread(
            target=rig.channel.close if closing == "channel" else rig.connection.close
        )
        closer.start()
        closer.join(0.3)
        assert closer.is_alive(), "the close should wait for the round in flight"
        proxy.cut()  # the round fails; its ack goes back to the buffer
        closer.join(10)
        assert not closer.is_alive()
    rig.connection.close()
    assert "the next connection writes them" in caplog.text
    assert rig.count(ids[0], "Acked") == 0

    proxy.restore()
    again = Rig(rig.url, rig.options, prefetch=2)  # the same store, as in a worker
    try:
        again.claim_cycle()  # its first round writes it
        assert rig.count(ids[0], "Acked") == 1
    finally:
        again.close()


# -- ETAs ------------------------------------------------------------------------


def test_the_loop_wakes_for_the_next_eta_and_an_earlier_publish_moves_it_forward(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(prefetch=4)
    store = rig.transport.store
    late = rig.publish(eta=store.now() + 60)
    rig.claim_cycle()
    assert rig.delivered == []
    timer = rig.hub.next_at()
    assert timer is not None and timer.when is not None, "no timer for the scheduled message"
    assert timer.when - time.monotonic() == pytest.approx(60, abs=2)

    # A publish due sooner wakes the consumer (it is no ready message, but its
    # queue is named), and the claim that wake-up brings sets the timer sooner.
    soon = rig.publish(eta=store.now() + 1.0)
    assert rig.transport.listener.wait(5), "a scheduled publish woke no one"
    rig.claim_cycle()
    assert rig.delivered == []
    assert timer.cancelled
    timer = rig.hub.next_at()
    assert timer is not None and timer.when is not None
    assert timer.when - time.monotonic() == pytest.approx(1.0, abs=0.5)

    # Its timer claims it once due, with no poll (QUIET polls once an hour).
    assert not rig.poller.claimer._requests
    time.sleep(max(0.0, timer.when - time.monotonic()))
    rig.hub.fire(timer)
    rig.take_claim()
    assert rig.ids() == soon
    claimed = [e for e in rig.log.read_stream(soon[0]) if e.type == "Claimed"]
    published = rig.log.read_stream(soon[0])[0]
    assert claimed and claimed[0].recorded_at >= published.event.not_before
    # And the timer is set again for the one still scheduled.
    timer = rig.hub.next_at()
    assert timer is not None and timer.when is not None
    assert timer.when - time.monotonic() == pytest.approx(59, abs=2)
    assert rig.types(late[0]) == ["Published"]


def test_an_eta_timer_fires_when_the_database_finds_the_message_due(
    make_rig: Callable[..., Rig],
) -> None:
    """The host's estimate of its offset from the database's clock is only as
    good as the round trip it was measured over.  The timer counts from the
    claim round's own time, by the clock that compares ETAs, so an estimate
    that runs ahead does not fire it early into an empty claim."""
    rig = make_rig(prefetch=4)
    db = rig.transport.store.db
    if db.dialect.clock_query() is None:
        pytest.skip("SQLite's clock is this host's: there is no offset to estimate")
    soon = rig.publish(eta=db.now() + 1.0)
    db._clock_offset = (db._clock_offset or 0.0) + 0.5  # as if measured over a slow trip
    rig.claim_cycle()
    assert rig.delivered == []
    timer = rig.hub.next_at()
    assert timer is not None and timer.when is not None
    assert timer.when - time.monotonic() == pytest.approx(1.0, abs=0.3)

    time.sleep(max(0.0, timer.when - time.monotonic()))
    rig.hub.fire(timer)
    rig.take_claim()
    assert rig.ids() == soon
