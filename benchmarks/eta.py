"""ETA lateness with a real worker: how long after its ETA a countdown task starts.

For each dialect -- PostgreSQL (a scratch schema) and SQLite (a temporary file) --
an idle prefork worker (``-c 2``) runs ``noop`` tasks published one at a time with
countdowns spread over 0.5-5 s, and the table gives the lateness of each:

* ``start`` -- the task's start in the worker minus its ETA (host clock);
* ``claim`` -- its ``Claimed`` event minus its ``not_before``, both by the store's
  clock (the database's on PostgreSQL): the part the transport owns.

Usage: ``python benchmarks/eta.py [--tasks N] [--polling-interval S] [--only NAME ...]``.
The default polling interval is the transport's (1 s): lateness well under it
shows the worker woke for the ETA, not for a poll.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from e2e_rig import Peer, Worker, peers, read_marks, run_client

from celery_eventstore import lifecycle as lc
from celery_eventstore.storage import EventStore

COUNTDOWNS = (0.5, 5.0)


def measure(peer: Peer, tasks: int, workdir: Path) -> dict[str, Any]:
    marks = workdir / f"eta-{peer.name.replace('+', '-')}"
    marks.mkdir()
    worker = Worker(peer, marks)
    try:
        # Publish one at a time, each with its own countdown, a little apart: the
        # worker is idle at every ETA but the next publish often comes first.
        published = run_client(peer, f"""
import json, random, time
from datetime import datetime, timezone
random.seed(12)
ids = []
for _ in range({tasks}):
    countdown = random.uniform({COUNTDOWNS[0]}, {COUNTDOWNS[1]})
    eta = time.time() + countdown
    when = datetime.fromtimestamp(eta, timezone.utc)
    ids.append(noop.apply_async((eta,), eta=when).id)
    time.sleep(random.uniform(0.05, 0.4))
print(json.dumps({{"ids": ids}}))
""", timeout=tasks * 2 + 120)
        deadline = time.time() + COUNTDOWNS[1] + 60
        while len(read_marks(marks)) < tasks and time.time() < deadline:
            time.sleep(0.2)
    finally:
        worker.stop()
    starts = sorted(delay for _, delay in read_marks(marks))
    claims = sorted(claim_lateness(peer, published["ids"]))
    return {"tasks": len(starts), **percentiles("start", starts),
            **percentiles("claim", claims)}


def claim_lateness(peer: Peer, ids: list[str]) -> list[float]:
    """Claimed minus not_before, by the store's clock, for each task's first claim."""
    store = EventStore(peer.broker, **{k: v for k, v in peer.options.items() if k == "schema"})
    try:
        out = []
        for task_id in ids:
            events = store.read_stream(task_id)
            published = next(e.event for e in events if isinstance(e.event, lc.Published))
            claimed = next((e for e in events if isinstance(e.event, lc.Claimed)), None)
            if claimed is not None and published.not_before is not None:
                out.append(claimed.recorded_at - published.not_before)
        return out
    finally:
        store.close()


def percentiles(name: str, values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        f"{name} p50 ms": statistics.median(values) * 1000,
        f"{name} p99 ms": values[min(len(values) - 1, int(len(values) * 0.99))] * 1000,
        f"{name} max ms": values[-1] * 1000,
    }


COLUMNS = ["tasks", "start p50 ms", "start p99 ms", "start max ms",
           "claim p50 ms", "claim p99 ms", "claim max ms"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200, help="countdown tasks per dialect")
    parser.add_argument("--polling-interval", type=float, default=1.0,
                        help="the transport's safety-net poll, seconds")
    parser.add_argument("--only", nargs="*", help="eventstore+postgresql, eventstore+sqlite")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="celery-eta-"))
    table: dict[str, dict[str, Any]] = {}
    try:
        for peer in peers(workdir):
            wanted = peer.name.startswith("eventstore") and (
                not args.only or peer.name in args.only
            )
            if wanted:
                peer.options["polling_interval"] = args.polling_interval
                print(f"measuring {peer.name} ...", file=sys.stderr, flush=True)
                try:
                    table[peer.name] = measure(peer, args.tasks, workdir)
                except Exception as exc:  # noqa: BLE001 - reported in the table
                    table[peer.name] = {"error": str(exc)[:200]}
            if peer.cleanup:
                peer.cleanup()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\nETA lateness, countdowns {COUNTDOWNS[0]}-{COUNTDOWNS[1]} s, "
          f"polling_interval {args.polling_interval} s ({stamp})")
    print(f"{'broker':<24}" + "".join(f"{c:>14}" for c in COLUMNS))
    for name, row in table.items():
        if "error" in row:
            print(f"{name:<24} error: {row['error']}")
            continue
        cells = "".join(f"{row[c]:>14.1f}" if c in row else f"{'-':>14}" for c in COLUMNS)
        print(f"{name:<24}{cells}")
    es = table.get("eventstore+postgresql", {})
    if "start p99 ms" in es:
        print(f"\ngoal: p99 start lateness on PostgreSQL <= 50 ms: {es['start p99 ms']:.1f} ms")
    return 1 if any("error" in row for row in table.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
