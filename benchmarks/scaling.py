"""Many worker hosts on one database: drain rate and claim latency as solo-pool
worker processes are added, the event store on PostgreSQL beside Redis.

For each broker and each worker count (1, 2, 4, 8, 16 by default):

* **drain rate** -- ``count`` workers (``-P solo``, each its own node name
  ``wN@scaling`` and its own connections, as separate hosts would be) wait on an
  empty queue; the queue ``bench`` is filled with ``--tasks`` no-op tasks; a
  control broadcast (``add_consumer``) sets every worker on it at once; the rate
  is tasks over the time from the first task's start to the last one's;
* **claim latency** -- publish-to-start time of ``--samples`` tasks sent one at a
  time (20 ms apart) to the idle workers (p50, p99);
* **wait events** (PostgreSQL) -- ``pg_stat_activity`` sampled every 50 ms during
  the drain: what the workers' active backends were waiting on.  ``Lock`` waits
  (``tuple``, ``transactionid``) would mean claims convoy on hot rows;
  ``Client``/``IO``/``LWLock`` ones are the server being busy, not blocked.

Usage::

    python benchmarks/scaling.py                     # 1..16 workers, 5000 tasks each
    python benchmarks/scaling.py --tiny              # smoke run: 1 and 2 workers, 60 tasks
    python benchmarks/scaling.py --counts 1,4 --only eventstore

Needs PostgreSQL (``$CELERY_EVENTSTORE_TEST_POSTGRESQL_URL``) and Redis on
127.0.0.1 (database 14 is flushed).  Measure on a quiet machine: the workers, the
database and this script share its cores.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from e2e_rig import PG, Peer, env_for, read_marks, run_client, scratch_schema

REDIS = "redis://127.0.0.1:6379/14"
#: The workers' connections carry this application_name, so the sampler sees only theirs.
APP_NAME = "scaling_bench"
SAMPLE_EVERY = 0.05
READY_TIMEOUT = 120.0


def eventstore_peer() -> Peer:
    url, schema, drop = scratch_schema("scaling")
    named = url.update_query_dict({"application_name": APP_NAME}).render_as_string(
        hide_password=False
    )
    return Peer("eventstore+postgresql", f"eventstore+{named}", None, {"schema": schema},
                cleanup=drop)


def redis_peer() -> Peer:
    return Peer("redis", REDIS)


class Workers:
    """``count`` solo workers, each its own node, waiting on the empty queue ``idle``."""

    def __init__(self, peer: Peer, count: int, marks: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        for n in range(count):
            log = marks.parent / f"worker-{marks.name}-{n}.log"
            self.logs.append(log)
            with open(log, "wb") as out:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "celery", "-A", "e2e_tasks", "worker",
                     "-P", "solo", "-Q", "idle", "-n", f"w{n}@scaling", "-l", "info",
                     "--without-gossip", "--without-mingle", "--without-heartbeat"],
                    env=env_for(peer, marks), stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,
                ))  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT
        for proc, log in zip(self.procs, self.logs, strict=True):
            while "ready." not in log.read_text(errors="replace"):
                if time.monotonic() > deadline or proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("a worker did not start:\n" + log.read_text()[-1500:])
                time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


class WaitSampler(threading.Thread):
    """Counts the wait events of the workers' active backends every 50 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.counts: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self._done = threading.Event()
        self._engine = sa.create_engine(PG, poolclass=sa.pool.NullPool)

    def run(self) -> None:
        query = sa.text(
            "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') FROM pg_stat_activity"
            " WHERE application_name = :n AND state = 'active'"
        )
        with self._engine.connect() as conn:
            while not self._done.wait(SAMPLE_EVERY):
                self.counts.update(conn.execute(query, {"n": APP_NAME}).scalars())
                conn.commit()
                self.samples += 1

    def stop(self) -> dict[str, Any]:
        self._done.set()
        self.join(10)
        self._engine.dispose()
        return {"samples": self.samples, "waits": dict(self.counts.most_common())}


def measure(peer: Peer, count: int, tasks: int, samples: int, workdir: Path) -> dict[str, Any]:
    marks = workdir / f"{peer.name}-{count}"
    marks.mkdir()
    workers = Workers(peer, count, marks)
    sampler = WaitSampler() if peer.name.startswith("eventstore") else None
    result: dict[str, Any] = {}
    try:
        run_client(peer, f"""
import json
app.control.purge()
for _ in range({tasks}):
    noop.apply_async(queue="bench")
print(json.dumps({{}}))
""")
        if sampler is not None:
            sampler.start()
        run_client(peer, """
import json
app.control.add_consumer("bench", reply=False)
print(json.dumps({}))
""")
        deadline = time.monotonic() + 60 + tasks / 10
        while len(read_marks(marks)) < tasks:
            if time.monotonic() > deadline:
                raise RuntimeError(f"drained only {len(read_marks(marks))} of {tasks}")
            time.sleep(0.2)
        if sampler is not None:
            result.update(sampler.stop())
            sampler = None
        starts = [s for s, _ in read_marks(marks)]
        result["drain/s"] = (len(starts) - 1) / max(starts[-1] - starts[0], 1e-9)
        for path in marks.glob("*.log"):
            path.unlink()
        run_client(peer, f"""
import json, time
for _ in range({samples}):
    noop.apply_async((time.time(),), queue="bench")
    time.sleep(0.02)
print(json.dumps({{}}))
""")
        deadline = time.monotonic() + 60
        while len(read_marks(marks)) < samples and time.monotonic() < deadline:
            time.sleep(0.2)
        delays = sorted(d for _, d in read_marks(marks) if d >= 0)
        if delays:
            result["p50 ms"] = statistics.median(delays) * 1000
            result["p99 ms"] = delays[min(len(delays) - 1, int(len(delays) * 0.99))] * 1000
    finally:
        if sampler is not None:
            sampler.stop()
        workers.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,2,4,8,16", help="worker counts, comma-separated")
    parser.add_argument("--tasks", type=int, default=5000, help="tasks drained per count")
    parser.add_argument("--samples", type=int, default=100, help="latency samples per count")
    parser.add_argument("--only", choices=["eventstore", "redis"], help="one broker only")
    parser.add_argument("--tiny", action="store_true", help="smoke run: 1,2 workers, 60 tasks")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    tasks, samples = args.tasks, args.samples
    if args.tiny:
        counts, tasks, samples = [1, 2], 60, 10
    makers = {"eventstore": eventstore_peer, "redis": redis_peer}
    workdir = Path(tempfile.mkdtemp(prefix="celery-scaling-"))
    rows: list[tuple[str, int, dict[str, Any]]] = []
    try:
        for name, make in makers.items():
            if args.only and name != args.only:
                continue
            for count in counts:
                print(f"measuring {name} with {count} worker(s) ...", file=sys.stderr, flush=True)
                try:
                    peer = make()
                except Exception as exc:  # noqa: BLE001 - reported in the table
                    rows.append((name, count, {"error": str(exc)[:200]}))
                    continue
                try:
                    rows.append((peer.name, count, measure(peer, count, tasks, samples, workdir)))
                except Exception as exc:  # noqa: BLE001 - reported in the table
                    rows.append((peer.name, count, {"error": str(exc)[:200]}))
                finally:
                    if peer.cleanup:
                        peer.cleanup()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(rows)
    return 1 if any("error" in row for _, _, row in rows) else 0


def print_table(rows: list[tuple[str, int, dict[str, Any]]]) -> None:
    print(f"\n{'broker':<24}{'workers':>8}{'drain/s':>10}{'p50 ms':>9}{'p99 ms':>9}  "
          "wait events of active backends (share of samples)")
    for name, count, row in rows:
        if "error" in row:
            print(f"{name:<24}{count:>8}  error: {row['error']}")
            continue
        waits = row.get("waits") or {}
        total = sum(waits.values()) or 1
        shown = ", ".join(f"{k} {v / total:.0%}" for k, v in list(waits.items())[:4])
        cells = "".join(
            f"{row[c]:>{w}.1f}" if c in row else f"{'-':>{w}}"
            for c, w in (("drain/s", 10), ("p50 ms", 9), ("p99 ms", 9))
        )
        print(f"{name:<24}{count:>8}{cells}  {shown}")
    locks = sum(
        v for _, _, row in rows for k, v in (row.get("waits") or {}).items()
        if k.startswith("Lock:")
    )
    print(f"\nLock waits sampled on the event store's backends: {locks}")


if __name__ == "__main__":
    raise SystemExit(main())
