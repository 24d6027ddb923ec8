"""Celery end to end on this machine: the event store against Redis, RabbitMQ and
kombu's SQL transport, all measured in the same run.

For each broker:

* publish rate -- ``delay()`` from one process, no result backend;
* drain rate -- a prefork worker (``-c 2``) emptying a pre-filled queue of no-op
  tasks, from its first task's start to its last one's;
* publish-to-start latency -- one task at a time to an idle worker (p50, p99);
* round trip -- ``delay().get()`` with the broker's own result backend, where
  there is one (the event store, Redis).

Usage: ``python benchmarks/celery_e2e.py [--quick] [--only NAME ...]``.  Needs
PostgreSQL, Redis and RabbitMQ on 127.0.0.1 (as CI has them); a peer that cannot
be reached is reported, not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

HERE = Path(__file__).resolve().parent
PG = os.environ.get("CELERY_EVENTSTORE_TEST_POSTGRESQL_URL",
                    "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


@dataclass
class Peer:
    name: str
    broker: str
    backend: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    #: Slow peers drain fewer messages (their rate is still a rate).
    scale: float = 1.0
    cleanup: Any = None


def peers(workdir: Path) -> list[Peer]:
    pg_plain = sa.make_url(PG).set(drivername="postgresql+psycopg2")
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(pg_plain)
    with engine.begin() as conn:
        conn.execute(sa.schema.CreateSchema(schema))

    def drop_schema() -> None:
        with engine.begin() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=True))
        engine.dispose()

    pg_url = pg_plain.render_as_string(hide_password=False)
    sqlite = f"sqlite:///{workdir / 'bench.db'}"
    kombu_sqla_schema = f"bench_sqla_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(sa.schema.CreateSchema(kombu_sqla_schema))

    def drop_sqla_schema() -> None:
        with sa.create_engine(pg_plain).begin() as conn:
            conn.execute(sa.schema.DropSchema(kombu_sqla_schema, cascade=True))

    return [
        Peer("eventstore+postgresql", f"eventstore+{pg_url}", f"eventstore+{pg_url}",
             {"schema": schema}, cleanup=drop_schema),
        Peer("eventstore+sqlite", f"eventstore+{sqlite}", f"eventstore+{sqlite}"),
        Peer("redis", "redis://127.0.0.1:6379/15", "redis://127.0.0.1:6379/15"),
        Peer("amqp", "amqp://guest:guest@127.0.0.1:5672//"),
        Peer("sqla+postgresql",
             f"sqla+{pg_url}?options=-csearch_path%3D{kombu_sqla_schema}",
             None, scale=0.15, cleanup=drop_sqla_schema),
    ]


def env_for(peer: Peer, marks: Path | None, backend: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        E2E_BROKER=peer.broker,
        E2E_BACKEND=(peer.backend or "") if backend else "",
        E2E_TRANSPORT_OPTIONS=json.dumps(peer.options),
        E2E_MARKS=str(marks) if marks else "",
        PYTHONPATH=str(HERE) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def run_client(peer: Peer, code: str, marks: Path | None = None, backend: bool = False,
               timeout: float = 600) -> dict[str, Any]:
    """Run ``code`` in a fresh process with the peer's app; it prints one JSON line."""
    out = subprocess.run(
        [sys.executable, "-c", "from e2e_tasks import app, noop, echo\n" + code],
        env=env_for(peer, marks, backend), capture_output=True, text=True, timeout=timeout,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr else "failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


class Worker:
    def __init__(self, peer: Peer, marks: Path | None, backend: bool = False) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "e2e_tasks", "worker", "-P", "prefork",
             "-c", "2", "-l", "info", "--without-gossip", "--without-mingle",
             "--without-heartbeat"],
            env=env_for(peer, marks, backend), stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 60
        while "ready." not in Path(self.log.name).read_text():
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError(
                    "worker did not start:\n" + Path(self.log.name).read_text()[-2000:]
                )
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        os.unlink(self.log.name)


def read_marks(marks: Path) -> list[tuple[float, float]]:
    rows = []
    for path in marks.glob("*.log"):
        for line in path.read_text().splitlines():
            started, delay = line.split()
            rows.append((float(started), float(delay)))
    return sorted(rows)


def measure(peer: Peer, n: int, samples: int, workdir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    count = max(50, int(n * peer.scale))
    # 1. publish rate (the same messages are then drained).
    published = run_client(peer, f"""
import time, json
noop.delay()  # connect and declare before timing
t = time.perf_counter()
for _ in range({count}):
    noop.delay()
print(json.dumps({{"rate": {count} / (time.perf_counter() - t)}}))
""")
    result["publish/s"] = published["rate"]
    # 2. drain rate of the pre-filled queue (count + 1 messages).
    marks = workdir / f"drain-{peer.name}"
    marks.mkdir()
    worker = Worker(peer, marks)
    try:
        deadline = time.time() + 600
        while len(read_marks(marks)) < count + 1:
            if time.time() > deadline:
                raise RuntimeError(f"drained only {len(read_marks(marks))} of {count + 1}")
            time.sleep(0.2)
        starts = [s for s, _ in read_marks(marks)]
        result["drain/s"] = (len(starts) - 1) / (starts[-1] - starts[0])
        # 3. publish-to-start latency on the now idle worker.
        lat = workdir / f"latency-{peer.name}"
        lat.mkdir()
        os.environ["E2E_MARKS_DUMMY"] = ""
        worker.stop()
        worker = Worker(peer, lat)
        k = max(20, int(samples * min(1.0, peer.scale * 4)))
        run_client(peer, f"""
import time, json
for _ in range({k}):
    noop.delay(time.time())
    time.sleep(0.02)
print(json.dumps({{}}))
""")
        deadline = time.time() + 120
        while len(read_marks(lat)) < k and time.time() < deadline:
            time.sleep(0.2)
        delays = sorted(d for _, d in read_marks(lat) if d >= 0)
        if delays:
            result["p50 ms"] = statistics.median(delays) * 1000
            result["p99 ms"] = delays[min(len(delays) - 1, int(len(delays) * 0.99))] * 1000
    finally:
        worker.stop()
    # 4. round trip with the result backend.
    if peer.backend:
        worker = Worker(peer, None, backend=True)
        try:
            rt = run_client(peer, f"""
import time, json
echo.delay(0).get(timeout=30)
times = []
for i in range({samples}):
    t = time.perf_counter()
    assert echo.delay(i).get(timeout=30) == i
    times.append(time.perf_counter() - t)
times.sort()
print(json.dumps({{"p50": times[len(times) // 2], "p99": times[int(len(times) * 0.99)]}}))
""", backend=True)
            result["get p50 ms"] = rt["p50"] * 1000
            result["get p99 ms"] = rt["p99"] * 1000
        finally:
            worker.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages and samples")
    parser.add_argument("--only", nargs="*", help="peers to measure (names as printed)")
    args = parser.parse_args()
    n, samples = (500, 50) if args.quick else (3000, 200)
    workdir = Path(tempfile.mkdtemp(prefix="celery-e2e-"))
    table: dict[str, dict[str, Any]] = {}
    try:
        for peer in peers(workdir):
            if args.only and peer.name not in args.only:
                if peer.cleanup:
                    peer.cleanup()
                continue
            print(f"measuring {peer.name} ...", file=sys.stderr, flush=True)
            try:
                table[peer.name] = measure(peer, n, samples, workdir)
            except Exception as exc:  # noqa: BLE001 - reported in the table
                table[peer.name] = {"error": str(exc)[:200]}
            finally:
                if peer.cleanup:
                    peer.cleanup()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(table)
    return 0


COLUMNS = ["publish/s", "drain/s", "p50 ms", "p99 ms", "get p50 ms", "get p99 ms"]


def print_table(table: dict[str, dict[str, Any]]) -> None:
    print(f"\n{'broker':<24}" + "".join(f"{c:>13}" for c in COLUMNS))
    for name, row in table.items():
        if "error" in row:
            print(f"{name:<24} error: {row['error']}")
            continue
        cells = "".join(f"{row[c]:>13.1f}" if c in row else f"{'-':>13}" for c in COLUMNS)
        print(f"{name:<24}{cells}")
    redis = table.get("redis", {})
    if "error" in redis or not redis:
        return
    print("\nratios to redis (throughput: higher is better; latency: lower is better)")
    for name, row in table.items():
        if name == "redis" or "error" in row:
            continue
        parts = [f"{c} {row[c] / redis[c]:.2f}x" for c in COLUMNS if c in row and c in redis]
        print(f"  {name:<22} " + ", ".join(parts))
    es, sqla = table.get("eventstore+postgresql", {}), table.get("sqla+postgresql", {})
    print("\ntargets")
    if "drain/s" in es:
        print(f"  drain on PostgreSQL >= redis:           {es['drain/s']:.0f}/s vs "
              f"{redis.get('drain/s', float('nan')):.0f}/s")
    if "p50 ms" in es:
        print(f"  p50 publish-to-start on PostgreSQL <= 10 ms: {es['p50 ms']:.1f} ms")
    if "drain/s" in es and "drain/s" in sqla:
        print(f"  >= 10x kombu sqla throughput:            "
              f"drain {es['drain/s'] / sqla['drain/s']:.1f}x, "
              f"publish {es['publish/s'] / sqla['publish/s']:.1f}x")
    if "get p50 ms" in es:
        print(f"  delay().get() p50 on PostgreSQL <= 15 ms:   {es['get p50 ms']:.1f} ms")


if __name__ == "__main__":
    raise SystemExit(main())
