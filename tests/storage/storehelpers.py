"""Helpers shared by the store tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from celery_eventstore.storage import EventStore


class FakeClock:
    """A clock the test moves by hand: lease expiry without sleeping."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


StoreFactory = Callable[..., EventStore]


def make_factory(db: tuple[str, dict[str, Any]]) -> Iterator[StoreFactory]:
    url, base = db
    made: list[EventStore] = []

    def factory(*, migrate: bool = True, **options: Any) -> EventStore:
        store = EventStore(url, **{**base, **options})
        if migrate:
            store.migrate()
        made.append(store)
        return store

    yield factory
    for store in made:
        store.close()


def claim_and_ack_until_empty(
    url: str, options: dict[str, Any], queue: str | list[str], batch: int, out: Any
) -> None:
    """A racing consumer process: claims and acks until the queues stay empty."""
    store = EventStore(url, **options)
    queues = [queue] if isinstance(queue, str) else queue
    delivered: list[str] = []
    empty_rounds = 0
    while empty_rounds < 3:
        claimed = store.claim(queues, batch, f"pid-{id(store)}", 60)
        if not claimed:
            empty_rounds += 1
            continue
        empty_rounds = 0
        outcomes = store.ack([m.ref for m in claimed])
        assert set(outcomes.values()) == {"done"}, outcomes
        delivered.extend(m.stream for m in claimed)
    store.close()
    out.put(delivered)


def settle_in_rounds(
    url: str, options: dict[str, Any], queue: str, batch: int, seed: int, out: Any
) -> None:
    """A racing consumer that works as the transport's does: each round settles
    the claims of the one before and claims more (:meth:`EventStore.claim_round`),
    under a lease short enough to lose.  Before a round it records a result for
    some of its claims, as a worker would, and now and then stalls past the
    lease, so that others steal what it holds.  Reports the claims each round
    said were acked and those it said were stale."""
    import random
    import time

    from celery_eventstore import lifecycle as lc
    from celery_eventstore.exceptions import InvalidTransition

    store = EventStore(url, **options)
    rng = random.Random(seed)
    acked: list[str] = []
    stale: list[str] = []
    held: list[Any] = []
    empty_rounds = 0
    try:
        while empty_rounds < 3 or held:
            if held and rng.random() < 0.2:
                time.sleep(0.3)  # past the lease: another consumer may take them
            for m in held[::2]:
                try:
                    store.execute(m.stream, lc.Succeed(result={"n": 1}, claim=m.claim))
                except InvalidTransition:
                    pass  # a claim no longer current writes no result
            claims = {m.delivery: m.claim for m in held}
            done = store.claim_round([m.ref for m in held], [queue], batch, f"c{seed}", 0.2)
            for delivery, outcome in done.outcomes.items():
                (acked if outcome == "done" else stale).append(claims[delivery])
            held = done.claimed
            empty_rounds = 0 if held else empty_rounds + 1
    except Exception as exc:  # reported to the test instead of hanging it
        out.put(exc)
        raise
    store.close()
    out.put((acked, stale))


def run_and_record_results(
    url: str, options: dict[str, Any], queue: str, from_claim_state: bool, seed: int, out: Any
) -> None:
    """A racing worker that never acks: it claims one message under a lease
    short enough to lose, runs it for a random while (often past the lease, so
    another worker takes it over) and records its result with the claim it ran
    under -- ``from_claim_state``: decided on the state the claim left, as a
    Celery worker's result backend does.  Reports the ``(stream, claim)`` whose
    result the store recorded."""
    import random
    import time

    from celery_eventstore import lifecycle as lc

    store = EventStore(url, **options)
    rng = random.Random(seed)
    recorded: list[tuple[str, str]] = []
    empty_rounds = 0
    try:
        while empty_rounds < 5:
            claimed = store.claim([queue], 1, f"w{seed}", 0.05)
            if not claimed:
                # A claim that met a finished message whose lease ran out (never
                # acked here) settles it and returns nothing: that is no sign
                # the queue is done, while messages still wait unclaimed.
                empty_rounds = empty_rounds + 1 if store.queue_size(queue) == 0 else 0
                time.sleep(0.05)
                continue
            empty_rounds = 0
            m = claimed[0]
            time.sleep(rng.choice([0.0, 0.0, 0.02, 0.08]))
            events = store.execute(m.stream, lc.Succeed(result={"by": seed}, claim=m.claim),
                                   known=m.state if from_claim_state else None)
            if any(isinstance(e.event, lc.Succeeded) for e in events):
                recorded.append((m.stream, m.claim))
    except Exception as exc:  # reported to the test instead of hanging it
        out.put(exc)
        raise
    store.close()
    out.put(recorded)


def race_processes(jobs: list[tuple[Callable[..., None], tuple[Any, ...]]]) -> list[Any]:
    """Run each ``(target, args)`` in a process of its own at once (spawned: no
    state shared but the database); each target gets a queue as its last
    argument and puts one report on it (an exception fails the test).  Returns
    the reports, in no particular order."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, out)) for target, args in jobs]
    for p in procs:
        p.start()
    reports = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert not [r for r in reports if isinstance(r, Exception)], reports
    return reports


def race_consumers(
    store: EventStore, options: dict[str, Any], queue: str | list[str], processes: int,
    batch: int,
) -> list[list[str]]:
    """Race ``processes`` consumer processes (:func:`claim_and_ack_until_empty`) on
    ``store``'s database until the queues stay empty; each one's deliveries."""
    url = store.db.given_url.render_as_string(False)  # with its query
    return race_processes(
        [(claim_and_ack_until_empty, (url, options, queue, batch))] * processes
    )


def count_chord_parts(
    url: str, options: dict[str, Any], chord: str, parts: list[str], size: int, out: Any
) -> None:
    """A racing header-task finisher: counts its parts, reports if it completed the chord."""
    from celery_eventstore import lifecycle as lc

    store = EventStore(url, **options)
    completed = 0
    try:
        for part in parts:
            recorded = store.execute(chord, lc.CountChordPart(part, "SUCCESS", size))
            completed += sum(isinstance(r.event, lc.ChordCompleted) for r in recorded)
    except Exception as exc:  # reported to the test instead of hanging it
        out.put(exc)
        raise
    store.close()
    out.put(completed)


def migrate_when_told(url: str, options: dict[str, Any], ready: Any, go: Any, out: Any) -> None:
    """A racing migrator process: connects, waits for the start signal, migrates."""
    store = EventStore(url, **options)
    ready.put(True)
    go.wait(60)
    try:
        out.put(store.migrate())
    except Exception as exc:  # reported to the test instead of hanging it
        out.put(repr(exc))
        raise
    finally:
        store.close()


@contextmanager
def executed_statements() -> Iterator[list[str]]:
    """Every statement any engine sends to a database meanwhile."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    sa.event.listen(sa.Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", record)


def cycle_until_stopped(
    url: str, options: dict[str, Any], queue: str, ready: Any, stop: Any, out: Any
) -> None:
    """A busy consumer process: publishes, claims and acks one message at a time
    until told to stop; reports when each cycle ended (``time.time()``)."""
    import time

    from celery_eventstore.storage import NewMessage

    store = EventStore(url, **options)
    ended: list[float] = []
    try:
        n = 0
        while not stop.is_set():
            n += 1
            store.publish([NewMessage(stream=f"busy-{n}", queue=queue, message={"n": n})])
            claimed = store.claim([queue], 1, "busy", 60)
            store.ack([m.ref for m in claimed])
            ended.append(time.time())
            if n == 3:
                ready.set()
    finally:
        store.close()
        out.put(ended)
