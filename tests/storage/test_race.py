"""Racing OS processes against a real database: every message delivered exactly once."""

from __future__ import annotations

import collections

import pytest
import sqlalchemy as sa
from storehelpers import (
    count_chord_parts,
    race_consumers,
    race_processes,
    run_and_record_results,
    settle_in_rounds,
)

from celery_eventstore import lifecycle as lc
from celery_eventstore.storage import EventStore, NewMessage

MESSAGES = 2000
PROCESSES = 8


@pytest.fixture(params=["sqlite", "postgresql", "postgresql_partitioned", "postgresql_unprepared"])
def db(request):
    """A database; ``postgresql_partitioned``: stores on it create the log
    partitioned by day, where ``(stream_id, version, born)`` arbitrates;
    ``postgresql`` prepares statements on the server after five runs (psycopg2's
    default), ``postgresql_unprepared`` never (the nomination then brings tails)."""
    if request.param == "postgresql_partitioned":
        url, options = request.getfixturevalue("postgresql_db")
        return url, {**options, "partitioned_log": True}
    if request.param == "postgresql_unprepared":
        url, options = request.getfixturevalue("postgresql_db")
        unprepared = sa.make_url(url).set(drivername="postgresql+psycopg2")
        return unprepared.update_query_dict({"prepare_threshold": "none"}), options
    return request.getfixturevalue(f"{request.param}_db")


def race_on_a_queue(db, queue, messages, target, *args):
    """A store with ``messages`` tasks published to ``queue``, and the reports of
    PROCESSES racing processes, each running ``target(url, options, queue, *args,
    seed)`` with a seed of its own."""
    url, options = db
    store = EventStore(url, **options)
    store.migrate()
    store.publish([NewMessage(stream=f"task-{i}", queue=queue, message={"n": i})
                   for i in range(messages)])
    url = store.db.given_url.render_as_string(False)  # with its query
    reports = race_processes(
        [(target, (url, options, queue, *args, seed)) for seed in range(PROCESSES)]
    )
    return store, reports


def test_racing_consumers_deliver_each_message_exactly_once(db):
    url, options = db
    store = EventStore(url, **options)
    store.migrate()
    for start in range(0, MESSAGES, 500):
        store.publish(
            [NewMessage(stream=f"task-{i}", queue="race", message={"n": i})
             for i in range(start, start + 500)]
        )

    results = race_consumers(store, options, "race", PROCESSES, 10)

    delivered = collections.Counter(stream for r in results for stream in r)
    assert len(delivered) == MESSAGES
    assert max(delivered.values()) == 1, [s for s, n in delivered.items() if n > 1][:5]
    assert sum(1 for r in results if r) > 1, "only one process got work: no race happened"

    events = store.read_all(limit=10 * MESSAGES)
    keys = collections.Counter((e.stream, e.version) for e in events)
    assert max(keys.values()) == 1
    by_stream = collections.defaultdict(list)
    for e in events:
        by_stream[e.stream].append(e.type)
    assert len(by_stream) == MESSAGES
    assert all(t == ["Published", "Claimed", "Acked"] for t in by_stream.values())
    assert store.queue_size("race") == 0
    assert store.projection_rows()[store.tables.messages.name] == []
    store.close()


def test_racing_rounds_settle_each_claim_once_while_leases_are_stolen(db):
    """Consumers settling in rounds from the states their claims left (plus the
    tails since: results, steals) against consumers stealing their expired
    leases: each message is settled once, and the claims the rounds called
    acked are exactly those the log acked."""
    messages = 400
    store, reports = race_on_a_queue(db, "steal", messages, settle_in_rounds, 4)

    said_acked = collections.Counter(claim for acked, _ in reports for claim in acked)
    assert max(said_acked.values()) == 1
    events = store.read_all(limit=20 * messages)
    assert max(collections.Counter((e.stream, e.version) for e in events).values()) == 1
    # Settled once each: acked, or discarded by a claim that found its result
    # recorded (its holder stalled past the lease after the result).
    settled = [e for e in events if e.type in ("Acked", "Discarded")]
    assert sorted(e.stream for e in settled) == sorted(f"task-{i}" for i in range(messages))
    assert {e.event.claim for e in settled if e.type == "Acked"} == set(said_acked)
    steals = sum(e.type == "LeaseExpired" for e in events)
    assert steals > 0 and sum(len(stale) for _, stale in reports) > 0, "no lease was stolen"
    assert store.queue_size("steal") == 0
    store.close()


@pytest.mark.parametrize("from_claim_state", [False, True], ids=["read", "claim-state"])
def test_racing_workers_record_one_result_per_task_each_under_its_current_claim(
    db, from_claim_state
):
    """Workers that run past their leases while others take their messages over
    record results from racing processes: each task gets one result, written
    under the claim that was current when it was recorded (a result read
    before a takeover and written after it is fenced out, never appended).
    ``claim-state``: each result is decided on the state its claim left, with
    no read, as a Celery worker's are -- one decided on a state a takeover has
    since overtaken must lose, read, and be fenced out all the same."""
    tasks = 150
    store, reports = race_on_a_queue(
        db, "results", tasks, run_and_record_results, from_claim_state
    )

    said = [pair for report in reports for pair in report]
    events = store.read_all(limit=20 * tasks)
    assert max(collections.Counter((e.stream, e.version) for e in events).values()) == 1
    succeeded = [e for e in events if isinstance(e.event, lc.Succeeded)]
    assert sorted(e.stream for e in succeeded) == sorted(f"task-{i}" for i in range(tasks))
    current: dict[str, str] = {}  # stream -> its latest claim, in log order
    recorded_under = set()
    for e in events:
        if isinstance(e.event, lc.Claimed):
            current[e.stream] = e.event.claim
        elif isinstance(e.event, lc.Succeeded):
            recorded_under.add((e.stream, current[e.stream]))
    assert recorded_under == set(said)
    assert sum(isinstance(e.event, lc.Claimed) for e in events) > tasks, "no lease was lost"
    assert any(isinstance(e.event, lc.ResultFenced) for e in events), "no result was fenced"
    store.close()


def race_chord_parts(store: EventStore, options: dict, stream: str, parts: list[str],
                     size: int) -> None:
    """Count ``parts`` of ``stream`` (a chord of ``size``) from racing processes, each
    part by two of them (one walking forwards, one backwards, as a redelivered header
    task would count it twice), and check the chord completed exactly once."""
    url = store.db.given_url.render_as_string(False)  # with its query
    halves = PROCESSES // 2
    completions = race_processes([
        (count_chord_parts, (url, options, stream, parts[i::halves][::direction], size))
        for direction in (1, -1)
        for i in range(halves)
    ])
    assert sum(completions) == 1
    types = [r.type for r in store.read_stream(stream)]
    assert types.count("ChordPartDone") == size
    assert types[-1] == "ChordCompleted" and types.count("ChordCompleted") == 1


def test_racing_chord_parts_complete_the_chord_exactly_once(db):
    url, options = db
    store = EventStore(url, **options)
    store.migrate()
    size = PROCESSES * 10
    race_chord_parts(store, options, "chord:g", [f"part-{i}" for i in range(size)], size)
    store.close()


@pytest.mark.slow
def test_racing_parts_of_a_ten_thousand_part_chord_complete_it_exactly_once(db):
    url, options = db
    store = EventStore(url, **options)
    store.migrate()
    size, racing = 10_000, 200
    # The chord's first parts, appended in bulk through the same projection.
    store.append(
        "chord:big",
        [lc.ChordPartDone(f"part-{i}", "SUCCESS") for i in range(size - racing)],
        expected_version=0,
    )
    # Its last parts raced by processes.
    race_chord_parts(
        store, options, "chord:big", [f"part-{i}" for i in range(size - racing, size)], size
    )
    state = store.load("chord:big")
    assert state.counted == size and state.completed
    store.close()
