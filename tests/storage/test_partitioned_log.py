"""The partitioned log (PostgreSQL): made at creation, days made ahead, old days
dropped whole with their live streams moved forward -- while workers claim."""

from __future__ import annotations

import collections
import functools
import multiprocessing

import pytest
import sqlalchemy as sa
from storehelpers import FakeClock, claim_and_ack_until_empty, make_factory

from celery_eventstore import lifecycle as lc
from celery_eventstore.exceptions import ConfigurationError
from celery_eventstore.storage import EventStore, NewMessage
from celery_eventstore.storage.log import SECONDS_PER_DAY, birth_day

DAY = SECONDS_PER_DAY


def msg(stream, queue="q", **kw):
    return NewMessage(stream=stream, queue=queue, message={"body": stream}, **kw)


@pytest.fixture
def make_store(postgresql_db):
    url, options = postgresql_db
    yield from make_factory((url, {**options, "partitioned_log": True}))


def relkind(store: EventStore, name: str) -> str | None:
    with store.engine.connect() as conn:
        return conn.execute(
            sa.text("SELECT relkind FROM pg_class c JOIN pg_namespace n ON n.oid = relnamespace "
                    "WHERE relname = :name AND nspname = :schema"),
            {"name": name, "schema": store.schema},
        ).scalar()


def test_sqlite_refuses_the_option(sqlite_db):
    url, _ = sqlite_db
    with pytest.raises(ConfigurationError, match="PostgreSQL"):
        EventStore(url, partitioned_log=True)


def test_an_unpartitioned_log_is_not_taken_for_a_partitioned_one(postgresql_db):
    url, options = postgresql_db
    EventStore(url, **options).migrate()
    store = EventStore(url, **options, partitioned_log=True)
    with pytest.raises(ConfigurationError, match="created unpartitioned"):
        store.publish([msg("a")])
    assert EventStore(url, **options).partitioned is False


def test_creation_partitions_the_log_and_maintain_makes_days_ahead(make_store):
    clock = FakeClock(1_800_000_000.0)
    store = make_store(clock=clock)
    assert relkind(store, "eventstore_events") == "p"
    assert relkind(store, "eventstore_events_default") == "r"
    today = birth_day(clock.now)
    made = store.maintain(3)
    assert made == [store.partitions.name_of(d) for d in range(today, today + 4)]
    assert store.partitions.days() == list(range(today, today + 4))
    assert store.maintain(3) == []  # idempotent
    clock.advance(DAY)
    assert store.maintain(3) == [store.partitions.name_of(today + 4)]
    # Any process finds the layout by itself, without the option.
    other = make_store(clock=clock, partitioned_log=False)
    assert other.partitioned


def test_a_stream_stays_in_the_partition_of_its_birth_day(make_store):
    clock = FakeClock(1_800_000_000.0)
    store = make_store(clock=clock)
    store.maintain(3)
    store.publish([msg("a")])
    (m,) = store.claim(["q"], 1, "w", 30)
    clock.advance(DAY)  # acked the next day: still in the first day's partition
    store.ack([m.ref])
    store.execute("a", lc.Succeed(result={"body": "1"}))
    records = store.read_stream("a")
    assert [r.type for r in records] == ["Published", "Claimed", "Acked", "Succeeded"]
    assert {r.born for r in records} == {birth_day(clock.now - DAY)}


def test_prune_drops_old_days_and_moves_their_live_streams_forward(make_store):
    clock = FakeClock(1_800_000_000.0)
    store = make_store(clock=clock)
    first = birth_day(clock.now)
    store.partitions.create_ahead(10, first=first)
    # Day 0: finished tasks, one waiting for its ETA, one dead letter, one whose
    # result came later (day 2), and a chord.
    store.publish([msg(f"done{i}") for i in range(5)])
    store.publish([msg("later", not_before=clock.now + 5 * DAY), msg("poison"), msg("slow")])
    for m in store.claim(["q"], 10, "w", 30):
        if m.stream == "poison":
            store.reject([m.ref], requeue=False, reason="poison")
        else:
            store.ack([m.ref])
        store.execute(m.stream, lc.Succeed(result={"body": m.stream}))
    store.execute("chord:g", lc.CountChordPart("done0", "SUCCESS", 2))
    clock.advance(2 * DAY)
    store.execute("slow", lc.ExpireResult())
    # Day 3: new work.
    clock.advance(DAY)
    store.publish([msg("new")])
    positions = {r.stream: [e.position for e in store.read_stream(r.stream)]
                 for r in [msg("later"), msg("poison"), msg("slow")]}
    cutoff = (first + 2) * DAY  # days 0 and 1 are wholly before it
    assert store.prune(before=cutoff, dry_run=True) == 6

    assert store.prune(before=cutoff) == 6  # five done streams and the chord
    assert store.partitions.days()[0] == first + 2
    for stream in ("later", "poison", "slow"):
        records = store.read_stream(stream)
        assert [r.position for r in records] == positions[stream]
        assert {r.born for r in records} == {birth_day(clock.now)}
    assert store.read_stream("done0") == [] and store.read_stream("chord:g") == []
    assert [d.stream for d in store.dead_letters()] == ["poison"]
    # The moved stream is claimed, acked and read as any other.
    clock.advance(2 * DAY)
    assert {m.stream for m in store.claim(["q"], 5, "w", 30)} == {"later", "new"}
    pruned_rows = store.projection_rows()
    store.rebuild()
    assert pruned_rows == store.projection_rows()


def test_a_prune_of_an_unpartitioned_day_falls_back_to_batches(make_store):
    """Events of days without a partition sit in the DEFAULT one: deleted in batches."""
    clock = FakeClock(1_800_000_000.0)
    store = make_store(clock=clock)
    store.publish([msg("a"), msg("b")])
    for m in store.claim(["q"], 2, "w", 30):
        store.ack([m.ref])
    clock.advance(3 * DAY)
    store.maintain(1)
    assert store.prune(before=clock.now - DAY) == 2
    pruned_rows = store.projection_rows()
    store.rebuild()
    assert pruned_rows == store.projection_rows()


# -- moving streams while workers claim them ------------------------------------------

MESSAGES = 1500
CONSUMERS = 6


def shuttle(
    url: str, options: dict, days: tuple[int, int], rounds: int, out, moving=None
) -> None:
    """Move every live stream from one day's partition to the other and back;
    ``moving`` is set once the first batch has moved."""
    store = EventStore(url, **options)
    moved = 0
    try:
        for _ in range(rounds):
            for src, dst in (days, days[::-1]):
                part = store.partitions._table(store.partitions.name_of(src))
                while live := store.partitions._live(part, before=float("inf")):
                    store.db.retrying(functools.partial(store.partitions._move, part, live, dst))
                    moved += len(live)
                    if moving is not None:
                        moving.set()
        out.put(moved)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out.put(exc)


def test_streams_moved_while_consumers_claim_are_delivered_once(postgresql_db):
    url, options = postgresql_db
    options = {**options, "partitioned_log": True}
    store = EventStore(url, **options)
    store.migrate()
    today = birth_day(store.now())
    store.partitions.create_ahead(1, first=today - 1)
    for start in range(0, MESSAGES, 500):
        store.publish([msg(f"task-{i}", queue="race") for i in range(start, start + 500)])

    ctx = multiprocessing.get_context("spawn")
    out, moves, moving = ctx.Queue(), ctx.Queue(), ctx.Event()
    plain = store.url.render_as_string(False)
    mover = ctx.Process(
        target=shuttle, args=(plain, options, (today, today - 1), 30, moves, moving)
    )
    consumers = [
        ctx.Process(target=claim_and_ack_until_empty, args=(plain, options, "race", 5, out))
        for _ in range(CONSUMERS)
    ]
    mover.start()
    # Consumers start once the mover is moving, however fast they drain.
    assert moving.wait(120), "the mover never moved a stream"
    for p in consumers:
        p.start()
    results = [out.get(timeout=240) for _ in consumers]
    moved = moves.get(timeout=240)
    for p in [*consumers, mover]:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert not isinstance(moved, Exception), moved
    assert moved > MESSAGES, "the mover had nothing to move: no race happened"

    delivered = collections.Counter(stream for r in results for stream in r)
    assert len(delivered) == MESSAGES
    assert max(delivered.values()) == 1, [s for s, n in delivered.items() if n > 1][:5]
    events = store.read_all(limit=10 * MESSAGES)
    assert max(collections.Counter((e.stream, e.version) for e in events).values()) == 1
    by_stream = collections.defaultdict(list)
    for e in events:
        by_stream[e.stream].append(e)
    assert all([e.type for e in recs] == ["Published", "Claimed", "Acked"]
               for recs in by_stream.values())
    # Each stream in one partition: the arbiter (stream, version, born) held.
    assert all(len({e.born for e in recs}) == 1 for recs in by_stream.values())
    pruned_rows = store.projection_rows()
    store.rebuild()
    assert pruned_rows == store.projection_rows()
    store.close()


def run_cli(url: str, schema: str, *args: str) -> str:
    from click.testing import CliRunner

    from celery_eventstore.cli import eventstore as cli

    result = CliRunner().invoke(cli, ["--url", url, "--schema", schema, *args],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_the_cli_creates_a_partitioned_log_and_maintains_it(postgresql_db):
    url, options = postgresql_db
    schema = options["schema"]
    assert "PARTITION BY RANGE (born)" in run_cli(
        url, schema, "migrate", "--sql", "--partitioned-log"
    )
    assert run_cli(url, schema, "migrate", "--partitioned-log").startswith("schema at version")
    out = run_cli(url, schema, "maintain", "--days", "2")
    assert out.count("made ") == 3 and out.endswith("3 daily partitions (3 made)\n")
    assert run_cli(url, schema, "maintain", "--days", "2") == "3 daily partitions (0 made)\n"
    assert run_cli(url, schema, "prune", "--older-than", "30d") == "pruned 0 streams\n"


def test_maintain_on_an_unpartitioned_log_does_nothing(postgresql_db):
    url, options = postgresql_db
    run_cli(url, options["schema"], "migrate")
    assert run_cli(url, options["schema"], "maintain") == (
        "the log is not partitioned: nothing to do\n"
    )


def test_a_workers_sweep_makes_the_coming_days_once_in_a_while(make_store):
    clock = FakeClock(1_800_000_000.0)
    store = make_store(clock=clock)
    assert store.partitions.days() == []
    store.sweep()
    today = birth_day(clock.now)
    assert store.partitions.days() == list(range(today, today + 8))
    clock.advance(DAY)
    store.sweep()  # not due yet in this process (twice a day by its own clock)
    assert store.partitions.days() == list(range(today, today + 8))


def test_workers_making_the_same_days_at_once_take_turns(make_store):
    import threading

    stores = [make_store() for _ in range(4)]
    errors = []

    def make(store):
        try:
            store.maintain(5)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=make, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(stores[0].partitions.days()) == 6
