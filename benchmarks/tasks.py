"""Benchmark of ``celery-eventstore tasks``: finding tasks in a large log.

Run from the repository root::

    python benchmarks/tasks.py                       # 1,000,000 tasks per dialect
    python benchmarks/tasks.py --tasks 20000 --dialects sqlite      # a smoke run

For each dialect -- SQLite in a temporary file, PostgreSQL through ``psycopg2``
in a fresh schema the script creates and drops -- it fills a store with finished
tasks (``Published``, ``Claimed``, ``Started``, ``Succeeded`` or ``Failed``,
``Acked``; a few left waiting), then times :meth:`EventStore.tasks` with each
filter the command offers, and the command itself (in-process) once per filter.

The fill is the store's own append path -- :meth:`EventLog.append_pending`, which
every publish, claim and result goes through, projections and task index
included -- with the events of many tasks per transaction: building a log of a
million tasks one worker call at a time would take hours.  The store's clock is
injected so the tasks spread over ``--days`` days, and wake-ups are off (nobody
listens).  The script sends no SQL of its own to the store's tables unless
``--analyze`` asks it to refresh the planner's statistics of the task index
first, which autovacuum does on a server that has it on.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from click.testing import CliRunner

# Runnable as `python benchmarks/tasks.py` from a checkout without installing.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from celery_eventstore import lifecycle as lc  # noqa: E402
from celery_eventstore.cli import eventstore  # noqa: E402
from celery_eventstore.storage import EventStore, TaskFilter  # noqa: E402

DEFAULT_POSTGRESQL_URL = os.environ.get(
    "CELERY_EVENTSTORE_TEST_POSTGRESQL_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
DIALECTS = ("sqlite", "psycopg2")
NAMES = [f"proj.tasks.job{i:02d}" for i in range(20)]
QUEUES = ["celery", "reports", "mail", "billing"]
WORKERS = [f"celery@worker{i}" for i in range(8)]
GROUP_SIZE = 10  # one task in three is a member of a group of ten
#: Every FAILURE_EVERY-th task fails, every PENDING_EVERY-th is left waiting.
FAILURE_EVERY = 20
PENDING_EVERY = 50
REPEATS = 20


class Clock:
    """The store's clock, moved by the fill so the tasks spread over days."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def message(task_id: str, name: str, queue: str, group: str | None) -> dict[str, Any]:
    """A Celery-like message (protocol 2 headers; the store never reads the body)."""
    return {
        "body": "W1sxLCAyXSwge30sIHt9XQ==",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": name, "id": task_id, "root_id": task_id,
            "parent_id": None, "group": group, "retries": 0, "argsrepr": "(1, 2)",
            "kwargsrepr": "{}", "origin": "gen1@bench",
        },
        "properties": {"delivery_info": {"exchange": "", "routing_key": queue}},
    }


def task_events(i: int, task_id: str, now: float) -> tuple[list[lc.Event], dict[str, Any]]:
    """The events and publish metadata of the ``i``-th task."""
    name, queue = NAMES[i % len(NAMES)], QUEUES[i % len(QUEUES)]
    group = f"group-{i // (3 * GROUP_SIZE)}" if i % 3 == 0 else None
    delivery, claim = uuid.uuid4().hex, uuid.uuid4().hex
    metadata = {"task": name, "root_id": task_id, "retries": 0,
                **({"group": group} if group else {})}
    published = lc.Published(delivery, queue, message(task_id, name, queue, group))
    if i % PENDING_EVERY == 0:
        return [published], metadata
    worker = WORKERS[i % len(WORKERS)]
    outcome: lc.Event = (
        lc.Failed("ValueError: boom", delivery=delivery) if i % FAILURE_EVERY == 0
        else lc.Succeeded({"body": "3", "encoding": "utf-8"}, delivery=delivery)
    )
    return [
        published,
        lc.Claimed(delivery, claim, f"{worker}:1:abc", now + 60),
        lc.Started(worker, delivery=delivery),
        outcome,
        lc.Acked(delivery, claim),
    ], metadata


def fill(store: EventStore, clock: Clock, tasks: int, days: float, batch: int) -> float:
    """Append ``tasks`` tasks through the store's append path; returns the seconds."""
    started = time.perf_counter()
    step = days * 86400 / max(1, tasks // batch)
    done = 0
    while done < tasks:
        size = min(batch, tasks - done)
        with store.db.write() as tx:
            pending = []
            for i in range(done, done + size):
                task_id = str(uuid.UUID(int=i + 1))
                events, metadata = task_events(i, task_id, tx.now)
                pending.append((lc.fold(task_id, ()), events, metadata))
            store.log.append_pending(tx, pending)
        done += size
        clock.now += step
        if done % (batch * 50) == 0 or done == tasks:
            rate = done / (time.perf_counter() - started)
            log(f"  filled {done:,} tasks ({rate:,.0f}/s)")
    return time.perf_counter() - started


def queries(clock: Clock) -> list[tuple[str, TaskFilter, list[str]]]:
    """Each filter the command offers: a label, the filter, and the command's options."""
    day = 86400.0
    return [
        ("newest 50", TaskFilter(), []),
        ("--name", TaskFilter(name=NAMES[3]), ["--name", NAMES[3]]),
        ("--state FAILURE", TaskFilter(state="FAILURE"), ["--state", "FAILURE"]),
        ("--state PENDING", TaskFilter(state="PENDING"), ["--state", "pending"]),
        ("--queue", TaskFilter(queue="mail"), ["--queue", "mail"]),
        ("--worker", TaskFilter(worker=WORKERS[5]), ["--worker", WORKERS[5]]),
        ("--since 1d", TaskFilter(since=clock.now - day), ["--since", "1d"]),
        ("--until 20d ago", TaskFilter(until=clock.now - 20 * day), ["--until", "20d"]),
        ("--name --since 2d --until 1d",
         TaskFilter(name=NAMES[7], since=clock.now - 2 * day, until=clock.now - day),
         ["--name", NAMES[7], "--since", "2d", "--until", "1d"]),
        ("--name --state FAILURE", TaskFilter(name=NAMES[0], state="FAILURE"),
         ["--name", NAMES[0], "--state", "FAILURE"]),
        ("--group", TaskFilter(group_id="group-5"), ["--group", "group-5"]),
        ("--root", TaskFilter(root_id=str(uuid.UUID(int=12))), ["--root",
                                                                 str(uuid.UUID(int=12))]),
    ]


def timed(call: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        times.append((time.perf_counter() - started) * 1000)
    return times, result


def measure(store: EventStore, clock: Clock, cli_args: list[str], limit: int) -> list[str]:
    rows = []
    for label, where, options in queries(clock):
        times, found = timed(lambda w=where: store.tasks(w, limit=limit), REPEATS)
        runner = CliRunner()
        started = time.perf_counter()
        out = runner.invoke(eventstore, [*cli_args, "tasks", "--limit", str(limit), *options])
        command_ms = (time.perf_counter() - started) * 1000
        if out.exit_code != 0:
            raise RuntimeError(f"tasks {options} failed: {out.output}")
        rows.append(
            f"{label:<32} {len(found):>5} {statistics.median(times):>9.2f} "
            f"{max(times):>9.2f} {command_ms:>11.1f}"
        )
    return rows


@contextmanager
def store_for(dialect: str, args: argparse.Namespace, clock: Clock) -> Iterator[
        tuple[EventStore, list[str]]]:
    """A fresh migrated store and the CLI's global options naming it."""
    if dialect == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{Path(args.sqlite_dir or tmp) / f'tasks-{uuid.uuid4().hex}.db'}"
            store = EventStore(url, clock=clock, notify=False)
            store.migrate()
            try:
                yield store, ["--url", url]
            finally:
                store.close()
        return
    url = sa.make_url(args.postgresql_url).set(drivername=f"postgresql+{dialect}")
    schema = f"bench_tasks_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    store = EventStore(url, schema=schema, clock=clock, notify=False)
    try:
        store.migrate()
        yield store, ["--url", url.render_as_string(hide_password=False), "--schema", schema]
    finally:
        store.close()
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def _qualified(table: sa.Table) -> str:
    return f"{table.schema}.{table.name}" if table.schema else table.name


def run(dialect: str, args: argparse.Namespace) -> None:
    clock = Clock(time.time() - args.days * 86400)
    with store_for(dialect, args, clock) as (store, cli_args):
        log(f"{dialect}: filling {args.tasks:,} tasks over {args.days:g} days")
        seconds = fill(store, clock, args.tasks, args.days, args.batch)
        if args.analyze:
            with store.engine.begin() as conn:
                conn.exec_driver_sql(f"ANALYZE {_qualified(store.tables.tasks)}")
        print(f"\n{dialect}: {args.tasks:,} tasks, {store.last_position():,} events, "
              f"filled in {seconds:.0f}s; {REPEATS} calls per row, limit {args.limit}")
        print(f"{'filter':<32} {'found':>5} {'median ms':>9} {'max ms':>9} {'command ms':>11}")
        for row in measure(store, clock, cli_args, args.limit):
            print(row)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=30.0,
                        help="the tasks' publish times spread over this many days")
    parser.add_argument("--batch", type=int, default=2000, help="tasks per fill transaction")
    parser.add_argument("--limit", type=int, default=50, help="tasks listed per call")
    parser.add_argument("--dialects", default=",".join(DIALECTS))
    parser.add_argument("--postgresql-url", default=DEFAULT_POSTGRESQL_URL)
    parser.add_argument("--sqlite-dir", default=None, help="directory of the SQLite file")
    parser.add_argument("--analyze", action="store_true",
                        help="ANALYZE the task index after the fill (what autovacuum does)")
    args = parser.parse_args()
    for dialect in args.dialects.split(","):
        run(dialect, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
