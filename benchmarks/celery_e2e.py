"""Celery end to end, the figures of issue 15: the event store against Redis and
RabbitMQ (and kombu's SQL transport), all measured in the same run.

Celery as installed, a prefork worker (``-c 2``, prefetch multiplier 4), no-op
tasks, the broker and the result backend configured as users do: the event store
for both on PostgreSQL and on SQLite, Redis for both, RabbitMQ with Redis results.
One run prints, per peer:

1. publish: ``delay()`` rate from one process, the call's p50/p99, and beside it
   the raw single-row ``INSERT`` + ``COMMIT`` latency of the same driver on the
   same database (sqlite3 on the same disk for SQLite);
2. the aggregate ``delay()`` rate of 8 producer processes publishing at once;
3. 1000 publishes inside one ``celery_eventstore.atomic()`` block (event store),
   beside Celery's own ``apply_async()`` floor (the same loop to ``memory://``);
4. drain without results (``ignore_result=True``) and with results: a worker set
   on a filled queue, first task start to last task end (after its result);
5. CPU per task of the worker processes and of the server processes, from
   ``/proc``, for both drains;
6. latency to an idle worker: publish -> start, publish -> result ready
   (``delay().get()`` returns) and sequential ``delay().get()`` round trips/s;
7. the SQLite rows (the embedded default) against Redis;

then the ratios of the event store to Redis and RabbitMQ, and the issue's targets
(met / not met).  See benchmarks/README.md for how each figure is taken.

Usage::

    python benchmarks/celery_e2e.py                    # all peers, ~4-5 minutes
    python benchmarks/celery_e2e.py --quick            # small counts, under 2 minutes
    python benchmarks/celery_e2e.py --runs 3 --json e2e.json
    python benchmarks/celery_e2e.py --only eventstore+postgresql,redis

Needs PostgreSQL (``$CELERY_EVENTSTORE_TEST_POSTGRESQL_URL``), Redis (database 15,
``$E2E_REDIS_URL``, is flushed) and RabbitMQ (``$E2E_AMQP_URL``) on 127.0.0.1; a
peer that cannot be reached is reported, not measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa

HERE = Path(__file__).resolve().parent
PG = os.environ.get("CELERY_EVENTSTORE_TEST_POSTGRESQL_URL",
                    "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("E2E_REDIS_URL", "redis://127.0.0.1:6379/15")
AMQP = os.environ.get("E2E_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
PEERS = ("eventstore+postgresql", "eventstore+unprepared", "eventstore+psycopg",
         "eventstore+sqlite", "redis", "rabbitmq", "sqla+postgresql")
#: The issue's worker + database CPU per task with results on PostgreSQL, µs.
BASELINE_CPU_US = 4440 + 1592
PRODUCERS = 8
ATOMIC_BLOCK = 1000
CLK_TCK = os.sysconf("SC_CLK_TCK")
CPUS = os.cpu_count() or 1
RESULT_MARK = "E2E-RESULT "
#: A Celery message is about this big; the raw commit writes as much.
PAYLOAD = json.dumps({"body": "x" * 900, "headers": {"task": "e2e.fire"}})


@dataclass(frozen=True)
class Counts:
    publish: int  # delay() from one process
    producer: int  # delay() per producer process, PRODUCERS of them
    results: int  # tasks drained with results
    starts: int  # publish -> start samples
    round_trips: int  # delay().get() samples
    atomic_blocks: int  # blocks of ATOMIC_BLOCK publishes
    raw_commits: int


DEFAULT = Counts(2000, 250, 2000, 200, 200, 3, 500)
QUICK = Counts(300, 40, 300, 40, 40, 1, 100)
TINY = Counts(20, 5, 20, 5, 5, 1, 20)


# -- processes ------------------------------------------------------------------------

_children: list[subprocess.Popen[Any]] = []


def spawn(args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start a process in a session of its own (Ctrl-C reaches only this script,
    which stops it), remembered so that nothing outlives the run."""
    proc = subprocess.Popen(args, start_new_session=True, **kwargs)
    _children.append(proc)
    return proc


def stop(proc: subprocess.Popen[Any], grace: float = 20.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc in _children:
        _children.remove(proc)


def stop_all() -> None:
    for proc in list(_children):
        stop(proc, grace=5.0)


@dataclass
class Peer:
    name: str
    broker: str
    backend: str | None
    #: The worker's URLs: on PostgreSQL they carry an application_name, so the
    #: server's processes that serve the worker can be found.
    worker_broker: str
    worker_backend: str | None
    queue: str
    options: dict[str, Any] = field(default_factory=dict)
    #: Broadcasts work (add_consumer sets the worker on a filled queue).
    control: bool = True
    #: Has a result backend: figures 4 (with results), 5 and 6 (results).
    results: bool = True
    #: Event store: the SQLAlchemy URL an application's atomic() block uses.
    atomic_url: str | None = None
    server_pids: Callable[[], list[int]] = list
    #: The 8 producers' broker URL where it differs: on PostgreSQL it carries an
    #: application_name of its own, so that their backends count in figure 2.
    producer_broker: str | None = None
    raw_commit: Callable[[int], list[float]] | None = None
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def queues(self) -> dict[str, str]:
        q = self.queue
        return {"fill": q, "results": f"{q}-results", "idle": f"{q}-idle",
                "atomic": f"{q}-atomic"}

    def env(self, trace: Path | None, producer: bool = False) -> dict[str, str]:
        worker = trace is not None
        broker = (self.producer_broker if producer else None) or self.broker
        env = dict(os.environ)
        env.update(
            E2E_BROKER=self.worker_broker if worker else broker,
            E2E_BACKEND=(self.worker_backend if worker else self.backend) or "",
            E2E_TRANSPORT_OPTIONS=json.dumps(self.options),
            E2E_QUEUE=self.queue,
            E2E_TRACE=str(trace) if worker else "",
            E2E_MARKS="",
            PYTHONPATH=str(HERE) + os.pathsep + env.get("PYTHONPATH", ""),
        )
        return env


REPL = f"""
import json, sys, time
from e2e_tasks import app, echo, fire
ns = {{"app": app, "echo": echo, "fire": fire, "time": time}}
for line in sys.stdin:
    ns["result"] = None
    try:
        exec(json.loads(line), ns)
        out = {{"ok": ns["result"]}}
    except BaseException as exc:
        out = {{"error": (type(exc).__name__ + ": " + str(exc))[:300]}}
    sys.stdout.write({RESULT_MARK!r} + json.dumps(out) + "\\n")
    sys.stdout.flush()
"""


class Client:
    """A process with the peer's Celery app that runs the snippets it is sent (one
    process for a peer's client side: no interpreter start per figure)."""

    def __init__(self, peer: Peer, workdir: Path, producer: bool = False) -> None:
        self.log = workdir / f"client-{uuid.uuid4().hex[:6]}.log"
        with open(self.log, "wb") as err:
            self.proc = spawn([sys.executable, "-c", REPL], env=peer.env(None, producer),
                              text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def send(self, code: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(code) + "\n")
        self.proc.stdin.flush()

    def result(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"client gave no answer in {timeout:.0f} s") from None
            if not line:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError("client exited: " + " | ".join(tail))
            if line.startswith(RESULT_MARK):
                answer = json.loads(line[len(RESULT_MARK):])
                if "error" in answer:
                    raise RuntimeError(answer["error"])
                return answer["ok"]

    def run(self, code: str, timeout: float = 300.0) -> Any:
        self.send(code)
        return self.result(timeout)

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        stop(self.proc)


class Worker:
    """``celery worker -P prefork -c 2`` consuming ``queues``; its tasks trace into
    ``trace``."""

    def __init__(self, peer: Peer, trace: Path, queues: str) -> None:
        self.node = f"e2e-{uuid.uuid4().hex[:8]}@localhost"
        self.log = trace / f"worker-{self.node}.log"
        with open(self.log, "wb") as out:
            self.proc = spawn(
                [sys.executable, "-m", "celery", "-A", "e2e_tasks", "worker", "-P", "prefork",
                 "-c", "2", "-l", "info", "-Q", queues, "-n", self.node,
                 "--without-gossip", "--without-mingle", "--without-heartbeat"],
                env=peer.env(trace), stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        ready = trace / f"ready-{self.proc.pid}"
        deadline = time.monotonic() + 120
        while not ready.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-1500:]
                self.stop()
                raise RuntimeError("worker did not start:\n" + tail)
            time.sleep(0.1)

    def pids(self) -> list[int]:
        return [self.proc.pid, *descendants(self.proc.pid)]

    def stop(self) -> None:
        stop(self.proc)


# -- /proc ------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from the 3rd (state) on


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def pids_named(*names: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() in names:
                    found.append(int(entry.name))
    return found


CpuSnapshot = dict[int, tuple[int, int]]  # pid -> (start time, CPU ticks)


def cpu_snapshot(pids: list[int], with_reaped: int | None = None) -> CpuSnapshot:
    """utime + stime of each process (all its threads); ``with_reaped`` also counts
    that process's reaped children (a pool process that was replaced)."""
    out = {}
    for pid in pids:
        fields = _stat(pid)
        if fields is None:
            continue
        ticks = int(fields[11]) + int(fields[12])
        if pid == with_reaped:
            ticks += int(fields[13]) + int(fields[14])
        out[pid] = (int(fields[19]), ticks)
    return out


def cpu_seconds(before: CpuSnapshot, after: CpuSnapshot) -> float:
    """CPU spent between the snapshots; a process new in ``after`` counts whole."""
    ticks = 0
    for pid, (start, now) in after.items():
        then = before.get(pid)
        ticks += now - (then[1] if then and then[0] == start else 0)
    return ticks / CLK_TCK


# -- peers ------------------------------------------------------------------------------


def _pg_url(driver: str = "psycopg2") -> sa.URL:
    return sa.make_url(PG).set(drivername=f"postgresql+{driver}")


def _url(url: sa.URL) -> str:
    return url.render_as_string(hide_password=False)


def _pg_schema(
    prefix: str, cleanups: list[Callable[[], None]], driver: str = "psycopg2"
) -> tuple[sa.Engine, str]:
    engine = sa.create_engine(_pg_url(driver), poolclass=sa.pool.NullPool)
    schema = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(sa.schema.CreateSchema(schema))

    def drop() -> None:
        with engine.begin() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=True))
        engine.dispose()

    cleanups.append(drop)
    return engine, schema


def _timed(n: int, once: Callable[[], None]) -> list[float]:
    for _ in range(min(10, n)):
        once()  # warm-up
    times = []
    for _ in range(n):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return times


def eventstore_postgresql(
    run: str, workdir: Path, driver: str = "psycopg2", prepared: bool = True
) -> Peer:
    """The event store on PostgreSQL through ``driver``: psycopg2, what a plain
    ``postgresql://`` URL picks, or psycopg (3); with either a statement is
    prepared on the server once it has run five times on a connection.  Not
    ``prepared``: psycopg2 with nothing prepared (``?prepare_threshold=none``),
    the default before, to show what preparing saves."""
    cleanups: list[Callable[[], None]] = []
    engine, schema = _pg_schema("e2e", cleanups, driver)
    tag = f"e2e_worker_{run}"
    store_url = _pg_url(driver)
    if not prepared:
        store_url = store_url.update_query_dict({"prepare_threshold": "none"})
    url = _url(store_url)
    worker_url = _url(store_url.update_query_dict({"application_name": tag}))
    producers_tag = f"e2e_producer_{run}"
    producer_url = _url(store_url.update_query_dict({"application_name": producers_tag}))

    def server_pids() -> list[int]:
        # The worker's backends, the 8 producers' (figure 2; gone before the
        # drains), and the processes that write and flush for everyone.
        query = sa.text("SELECT pid FROM pg_stat_activity WHERE application_name IN"
                        " (:tag, :producers) OR"
                        " backend_type IN ('walwriter', 'checkpointer', 'background writer')")
        with engine.connect() as conn:
            return list(conn.execute(query, {"tag": tag, "producers": producers_tag}).scalars())

    def raw_commit(n: int) -> list[float]:
        conn = engine.raw_connection()  # the driver's own connection: no SQLAlchemy per row
        try:
            cur = conn.cursor()
            cur.execute(f'CREATE TABLE IF NOT EXISTS "{schema}".raw_commit'
                        " (id bigserial PRIMARY KEY, data jsonb)")
            conn.commit()
            insert = f'INSERT INTO "{schema}".raw_commit (data) VALUES (%s)'

            def once() -> None:
                cur.execute(insert, (PAYLOAD,))
                conn.commit()

            return _timed(n, once)
        finally:
            conn.close()

    name = "eventstore+postgresql" if driver == "psycopg2" else f"eventstore+{driver}"
    if not prepared:
        name = "eventstore+unprepared"
    return Peer(name, f"eventstore+{url}", f"eventstore+{url}",
                f"eventstore+{worker_url}", f"eventstore+{worker_url}", f"e2e-{run}",
                {"schema": schema}, atomic_url=_url(_pg_url(driver)), server_pids=server_pids,
                producer_broker=f"eventstore+{producer_url}",
                raw_commit=raw_commit, cleanups=cleanups)


def eventstore_sqlite(run: str, workdir: Path) -> Peer:
    url = f"sqlite:///{workdir / f'eventstore-{run}.db'}"

    def raw_commit(n: int) -> list[float]:
        # The store's settings on the same disk: WAL, synchronous=NORMAL.
        conn = sqlite3.connect(workdir / f"raw-{run}.db")
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("CREATE TABLE IF NOT EXISTS raw_commit"
                         " (id INTEGER PRIMARY KEY, data TEXT)")
            conn.commit()

            def once() -> None:
                conn.execute("INSERT INTO raw_commit (data) VALUES (?)", (PAYLOAD,))
                conn.commit()

            return _timed(n, once)
        finally:
            conn.close()

    return Peer("eventstore+sqlite", f"eventstore+{url}", f"eventstore+{url}",
                f"eventstore+{url}", f"eventstore+{url}", f"e2e-{run}", atomic_url=url,
                raw_commit=raw_commit)


def _redis_flush() -> None:
    import redis

    client = redis.Redis.from_url(REDIS)
    client.flushdb()
    client.close()


def redis_peer(run: str, workdir: Path) -> Peer:
    _redis_flush()  # also proves it is reachable
    return Peer("redis", REDIS, REDIS, REDIS, REDIS, f"e2e-{run}",
                server_pids=lambda: pids_named("redis-server"), cleanups=[_redis_flush])


def rabbitmq_peer(run: str, workdir: Path) -> Peer:
    from kombu import Connection

    with Connection(AMQP, connect_timeout=5) as conn:
        conn.ensure_connection(max_retries=1)
    _redis_flush()
    peer = Peer("rabbitmq", AMQP, REDIS, AMQP, REDIS, f"e2e-{run}",
                server_pids=lambda: pids_named("beam.smp", "redis-server"))

    def delete_queues() -> None:
        with Connection(AMQP, connect_timeout=5) as conn:
            channel = conn.channel()
            for name in peer.queues().values():
                channel.queue_delete(name)
                channel.exchange_delete(name)

    peer.cleanups += [delete_queues, _redis_flush]
    return peer


def sqla_postgresql(run: str, workdir: Path) -> Peer:
    cleanups: list[Callable[[], None]] = []
    _, schema = _pg_schema("e2e_sqla", cleanups)
    broker = f"sqla+{_url(_pg_url())}?options=-csearch_path%3D{schema}"
    # kombu's SQL transport has no fanout (no add_consumer) and polls once a second:
    # it gets the publish, drain-without-results and start figures only.
    return Peer("sqla+postgresql", broker, None, broker, None, f"e2e-{run}", control=False,
                results=False, cleanups=cleanups)


MAKERS: dict[str, Callable[[str, Path], Peer]] = {
    "eventstore+postgresql": eventstore_postgresql,
    "eventstore+unprepared": lambda run, workdir: eventstore_postgresql(run, workdir,
                                                                        prepared=False),
    "eventstore+psycopg": lambda run, workdir: eventstore_postgresql(run, workdir, "psycopg"),
    "eventstore+sqlite": eventstore_sqlite,
    "redis": redis_peer,
    "rabbitmq": rabbitmq_peer,
    "sqla+postgresql": sqla_postgresql,
}


# -- measurements -----------------------------------------------------------------------


@dataclass
class Trace:
    task: str
    start: float
    end: float
    sent: float


def read_traces(trace: Path, task: str, since: float) -> list[Trace]:
    rows = []
    for path in trace.glob("*.trace"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[0] == task and float(parts[1]) >= since:
                rows.append(Trace(parts[0], float(parts[1]), float(parts[2]), float(parts[3])))
    return sorted(rows, key=lambda r: r.start)


def wait_traces(trace: Path, task: str, since: float, count: int, timeout: float) -> list[Trace]:
    deadline = time.monotonic() + timeout
    while len(rows := read_traces(trace, task, since)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{task}: {len(rows)} of {count} tasks ran in {timeout:.0f} s")
        time.sleep(0.05)
    return rows


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def ms(values: list[float], name: str) -> dict[str, float]:
    return {f"{name} p50 ms": statistics.median(values) * 1000,
            f"{name} p99 ms": percentile(values, 0.99) * 1000}


def publish(client: Client, n: int) -> dict[str, float]:
    """Figure 1: ``fire.delay()`` n times from one process, each call timed."""
    got = client.run(f"""
fire.delay()  # connect and declare before timing
times = []
begin = time.perf_counter()
for _ in range({n}):
    t = time.perf_counter()
    fire.delay()
    times.append(time.perf_counter() - t)
result = {{"times": times, "total": time.perf_counter() - begin}}
""")
    return {"publish/s": n / got["total"], **ms(got["times"], "delay")}


def producers(first: Client, peer: Peer, workdir: Path, n: int) -> dict[str, float]:
    """Figure 2: PRODUCERS processes, each connected and warmed up, told to go at once."""
    idle = peer.queues()["idle"]
    # Declared once before they start: 8 first declarations at once race in kombu's
    # SQL transport (a unique violation on its queue table).
    first.run(f"fire.apply_async(queue={idle!r})")
    clients = [Client(peer, workdir, producer=True) for _ in range(PRODUCERS)]
    try:
        for client in clients:
            client.send(f"fire.apply_async(queue={idle!r})")
        for client in clients:
            client.result(120)
        code = f"""
begin = time.time()
for _ in range({n}):
    fire.delay()
result = [begin, time.time()]
"""
        # Where the CPU goes: is the machine busy (bound by CPU per publish) or
        # waiting (bound by a lock or the flush)?  Taken before the clients close:
        # their server backends end with them.
        client_pids = [client.proc.pid for client in clients]
        clients_before, server_before = cpu_snapshot(client_pids), cpu_snapshot(peer.server_pids())
        for client in clients:
            client.send(code)
        spans = [client.result(300) for client in clients]
        clients_after = cpu_snapshot(client_pids)
        server_after = cpu_snapshot(sorted(set(server_before) | set(peer.server_pids())))
    finally:
        for client in clients:
            client.close()
    begin, end = min(s[0] for s in spans), max(s[1] for s in spans)
    cpu = cpu_seconds(clients_before, clients_after) + cpu_seconds(server_before, server_after)
    return {"producers/s": n * PRODUCERS / (end - begin),
            "producers cpu us": cpu / (n * PRODUCERS) * 1e6,
            "producers busy %": 100 * cpu / (end - begin) / CPUS}


def atomic_blocks(client: Client, peer: Peer, blocks: int) -> dict[str, float]:
    """Figure 3: ATOMIC_BLOCK publishes in one atomic() block on an application's
    SQLAlchemy connection, commit included; beside it, interleaved, the same loop
    through Celery's own apply_async() to a ``memory://`` broker (the floor any
    broker's publish stands on in this process)."""
    got = client.run(f"""
import sqlalchemy as sa
from celery import Celery
from celery_eventstore import atomic
engine = sa.create_engine({peer.atomic_url!r})
floor_app = Celery("e2e_floor", broker="memory://", set_as_current=False)
floor_app.conf.task_ignore_result = True

@floor_app.task(name="e2e.fire")
def floor_fire(sent=0.0):
    pass


def block(n):
    begin = time.perf_counter()
    with engine.connect() as conn, conn.begin(), atomic(conn, app=app):
        for _ in range(n):
            fire.apply_async(queue={peer.queues()['atomic']!r})
    return time.perf_counter() - begin

def floor(n):
    begin = time.perf_counter()
    for _ in range(n):
        floor_fire.apply_async(queue={peer.queues()['atomic']!r})
    return time.perf_counter() - begin

block(10), floor(10)  # connect, declare
result = [({ATOMIC_BLOCK} / block({ATOMIC_BLOCK}), {ATOMIC_BLOCK} / floor({ATOMIC_BLOCK}))
          for _ in range({blocks})]
engine.dispose()
""")
    atomic_rate = statistics.median(g[0] for g in got)
    floor_rate = statistics.median(g[1] for g in got)
    return {"atomic/s": atomic_rate, "atomic floor/s": floor_rate,
            "atomic of floor": atomic_rate / floor_rate}


def set_consuming(client: Client, worker: Worker, verb: str, name: str) -> None:
    client.run(f"""
result = app.control.{verb}({name!r}, destination=[{worker.node!r}], reply=True, timeout=10)
""", timeout=60)


def drain(peer: Peer, client: Client, worker: Worker, trace: Path, task: str, queue_name: str,
          count: int, label: str) -> dict[str, float]:
    """Figure 4 and 5: set the idle worker on the filled queue; time and CPU until
    the last of ``count`` tasks ended."""
    worker_pids, server_pids = worker.pids(), peer.server_pids()
    worker_before = cpu_snapshot(worker_pids, with_reaped=worker.proc.pid)
    main_before = cpu_snapshot([worker.proc.pid])
    server_before = cpu_snapshot(server_pids)
    since = time.time()
    set_consuming(client, worker, "add_consumer", queue_name)
    rows = wait_traces(trace, task, since, count, 60 + count / 20)
    worker_after = cpu_snapshot(worker.pids(), with_reaped=worker.proc.pid)
    main_after = cpu_snapshot([worker.proc.pid])
    server_after = cpu_snapshot(sorted(set(server_pids) | set(peer.server_pids())))
    worker_us = cpu_seconds(worker_before, worker_after) / len(rows) * 1e6
    # The consumer's own process (claims, deliveries, acks) apart from the pool's.
    main_us = cpu_seconds(main_before, main_after) / len(rows) * 1e6
    server_us = cpu_seconds(server_before, server_after) / len(rows) * 1e6
    span = max(r.end for r in rows) - rows[0].start
    rate = len(rows) / span
    return {f"drain {label}/s": rate,
            f"cpu {label} worker us": worker_us, f"cpu {label} server us": server_us,
            f"cpu {label} total us": worker_us + server_us,
            f"cpu {label} main us": main_us,
            # Near 100: bound by CPU per task; well under: by waiting (round trips, locks).
            f"busy {label} %": 100 * (worker_us + server_us) * rate / 1e6 / CPUS}


def start_latency(client: Client, trace: Path, queue_name: str, n: int) -> dict[str, float]:
    """Figure 6: one task every 20 ms to the idle worker; its start minus its send."""
    since = time.time()
    client.run(f"""
for _ in range({n}):
    fire.apply_async(kwargs={{"sent": time.time()}}, queue={queue_name!r})
    time.sleep(0.02)
""")
    rows = wait_traces(trace, "e2e.fire", since, n, 60)
    return ms([r.start - r.sent for r in rows], "start")


def round_trips(client: Client, queue_name: str, n: int) -> dict[str, float]:
    """Figure 6: sequential ``delay().get()``: publish -> result ready, and trips/s."""
    got = client.run(f"""
echo.apply_async((0,), queue={queue_name!r}).get(timeout=30)
times = []
begin = time.perf_counter()
for i in range({n}):
    t = time.perf_counter()
    assert echo.apply_async((i,), queue={queue_name!r}).get(timeout=30) == i
    times.append(time.perf_counter() - t)
result = {{"times": times, "total": time.perf_counter() - begin}}
""")
    return {**ms(got["times"], "result"), "get()/s": n / got["total"]}


def fill_results(client: Client, queue_name: str, n: int) -> dict[str, float]:
    got = client.run(f"""
begin = time.perf_counter()
for i in range({n}):
    echo.apply_async((i,), queue={queue_name!r})
result = time.perf_counter() - begin
""")
    return {"publish kept/s": n / got}


def progress(peer: Peer, what: str) -> None:
    print(f"  {peer.name}: {what}", file=sys.stderr, flush=True)


def measure(peer: Peer, counts: Counts, workdir: Path, out: dict[str, Any]) -> None:
    """Every figure for one peer, into ``out`` as they come (a failure keeps the rest)."""
    q = peer.queues()
    trace = workdir / f"trace-{peer.name.replace('+', '-')}-{uuid.uuid4().hex[:6]}"
    trace.mkdir()
    client = Client(peer, workdir)
    worker: Worker | None = None
    try:
        if peer.control:
            progress(peer, "worker")
            worker = Worker(peer, trace, q["idle"])
        progress(peer, f"publish {counts.publish}")
        # The raw commits are taken just before and just after the publishes, so
        # both see the same disk and the same load.
        raw = peer.raw_commit(counts.raw_commits // 2) if peer.raw_commit else []
        out.update(publish(client, counts.publish))
        if peer.raw_commit:
            raw += peer.raw_commit(counts.raw_commits - counts.raw_commits // 2)
            out.update(ms(raw, "raw commit"))
        progress(peer, f"{PRODUCERS} producers x {counts.producer}")
        out.update(producers(client, peer, workdir, counts.producer))
        filled = 1 + counts.publish + PRODUCERS * counts.producer
        progress(peer, f"drain {filled} without results")
        if worker is not None:
            out.update(drain(peer, client, worker, trace, "e2e.fire", q["fill"], filled,
                             "ignored"))
            set_consuming(client, worker, "cancel_consumer", q["fill"])
        else:  # no broadcast: start the worker on the filled queue (no CPU figure)
            since = time.time()
            worker = Worker(peer, trace, q["fill"])
            rows = wait_traces(trace, "e2e.fire", since, filled, 60 + filled / 5)
            out["drain ignored/s"] = len(rows) / (max(r.end for r in rows) - rows[0].start)
        if peer.results:
            progress(peer, f"drain {counts.results} with results")
            out.update(fill_results(client, q["results"], counts.results))
            out.update(drain(peer, client, worker, trace, "e2e.echo", q["results"],
                             counts.results, "results"))
        progress(peer, "latency to an idle worker")
        latency_queue = q["results"] if peer.control else q["fill"]
        out.update(start_latency(client, trace, latency_queue, counts.starts))
        if peer.results:
            out.update(round_trips(client, q["results"], counts.round_trips))
        worker.stop()
        worker = None
        if peer.atomic_url:
            progress(peer, f"atomic() x {counts.atomic_blocks}")
            out.update(atomic_blocks(client, peer, counts.atomic_blocks))
    finally:
        if worker is not None:
            worker.stop()
        client.close()


def measure_peer(name: str, run: str, counts: Counts, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        peer = MAKERS[name](run, workdir)
    except Exception as exc:  # noqa: BLE001 - reported in the tables
        return {"unreachable": f"{type(exc).__name__}: {exc}"[:200]}
    try:
        measure(peer, counts, workdir, out)
    except Exception as exc:  # noqa: BLE001 - reported in the tables
        out["error"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        for cleanup in peer.cleanups:
            try:
                cleanup()
            except Exception as exc:  # noqa: BLE001 - reported, the next one still runs
                print(f"  {name}: cleanup failed: {exc}", file=sys.stderr)
    return out


# -- the report -------------------------------------------------------------------------


def header(counts: Counts, names: list[str]) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpus": os.cpu_count(),
        "load average": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "python": sys.version.split()[0],
        "counts": counts.__dict__,
        "peers": names,
    }
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        info["git commit"] = commit + (" (uncommitted changes)" if dirty else "")
    import celery
    import kombu

    info["celery / kombu / sqlalchemy"] = (
        f"{celery.__version__} / {kombu.__version__} / {sa.__version__}")
    info["sqlite"] = sqlite3.sqlite_version
    settings = ("server_version", "fsync", "synchronous_commit", "commit_delay",
                "commit_siblings", "wal_sync_method", "full_page_writes", "autovacuum",
                "shared_buffers")
    try:
        engine = sa.create_engine(_pg_url(), poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT name, current_setting(name) FROM pg_settings"
                                        " WHERE name = ANY(:names)"), {"names": list(settings)})
            found = dict(rows.all())
        engine.dispose()
        info["postgresql"] = ", ".join(f"{k}={found[k]}" for k in settings if k in found)
    except Exception as exc:  # noqa: BLE001 - the header says so
        info["postgresql"] = f"unreachable ({exc.__class__.__name__})"
    with contextlib.suppress(Exception):
        import redis

        client = redis.Redis.from_url(REDIS, socket_connect_timeout=2)
        server = client.info("server")
        persistence = client.config_get("appendonly") | client.config_get("save")
        info["redis"] = f"{server['redis_version']}, " + ", ".join(
            f"{k}={v!r}" for k, v in persistence.items())
        client.close()
    with contextlib.suppress(Exception):
        from kombu import Connection

        with Connection(AMQP, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
            props = conn.connection.server_properties
            info["rabbitmq"] = props.get("version", "?")
    return info


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool = True
    ratio: bool = True


FIGURES: list[tuple[str, list[Metric]]] = [
    ("1. publish: delay() from one process", [
        Metric("publish/s", "delay() /s"),
        Metric("delay p50 ms", "delay() p50 ms", False),
        Metric("delay p99 ms", "delay() p99 ms", False),
        Metric("raw commit p50 ms", "raw INSERT+COMMIT p50 ms", False, ratio=False),
        Metric("raw commit p99 ms", "raw INSERT+COMMIT p99 ms", False, ratio=False),
        Metric("publish kept/s", "delay() /s, results kept"),
    ]),
    (f"2. publish from {PRODUCERS} producer processes at once", [
        Metric("producers/s", "aggregate delay() /s"),
        Metric("producers cpu us", "CPU per publish, clients+server, µs", False),
        Metric("producers busy %", "CPU busy, % of all cores", ratio=False),
    ]),
    (f"3. {ATOMIC_BLOCK} publishes in one atomic() block (event store only)", [
        Metric("atomic/s", "messages/s", ratio=False),
        Metric("atomic floor/s", "Celery's own apply_async floor, /s", ratio=False),
        Metric("atomic of floor", "atomic() rate / that floor", ratio=False),
    ]),
    ("4. drain, prefork -c 2, first task start to last task end", [
        Metric("drain ignored/s", "results ignored, tasks/s"),
        Metric("drain results/s", "with results, tasks/s"),
    ]),
    ("5. CPU per task (worker processes + server processes, /proc), µs", [
        Metric("cpu results worker us", "with results: worker", False),
        Metric("cpu results server us", "with results: server", False),
        Metric("cpu results total us", "with results: total", False),
        Metric("cpu ignored total us", "results ignored: total", False),
        Metric("cpu results main us", "with results: worker main process", False),
        Metric("cpu ignored main us", "results ignored: worker main process", False),
        Metric("busy results %", "with results: CPU busy, % of all cores", ratio=False),
        Metric("busy ignored %", "results ignored: CPU busy, % of cores", ratio=False),
    ]),
    ("6. latency to an idle worker", [
        Metric("start p50 ms", "publish->start p50 ms", False),
        Metric("start p99 ms", "publish->start p99 ms", False),
        Metric("result p50 ms", "publish->result p50 ms", False),
        Metric("result p99 ms", "publish->result p99 ms", False),
        Metric("get()/s", "delay().get() round trips/s"),
    ]),
]
LABEL = 42  # width of the figure column
SQLITE_ROWS = ["publish/s", "drain ignored/s", "drain results/s", "start p50 ms"]


def summarise(runs: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per peer and metric: median, min, max over the runs (and the runs' notes)."""
    summary: dict[str, dict[str, Any]] = {}
    for run in runs:
        for peer, row in run.items():
            into = summary.setdefault(peer, {"notes": []})
            for key, value in row.items():
                if key in ("error", "unreachable"):
                    into["notes"].append(f"{key}: {value}")
                else:
                    into.setdefault(key, []).append(value)
    for into in summary.values():
        for key, values in into.items():
            if key != "notes":
                into[key] = {"median": statistics.median(values), "min": min(values),
                             "max": max(values), "runs": len(values)}
    return summary


def median(summary: dict[str, dict[str, Any]], peer: str, key: str) -> float | None:
    cell = summary.get(peer, {}).get(key)
    return cell["median"] if cell else None


def number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def cell(summary: dict[str, dict[str, Any]], peer: str, key: str, runs: int) -> str:
    found = summary.get(peer, {}).get(key)
    if not found:
        return "-"
    text = number(found["median"])
    if runs > 1:
        text += f" ({number(found['min'])}..{number(found['max'])})"
    return text


def ratio(summary: dict[str, dict[str, Any]], peer: str, other: str, key: str) -> str:
    mine, theirs = median(summary, peer, key), median(summary, other, key)
    if mine is None or not theirs:
        return "-"
    return f"{mine / theirs:.2f}x"


def print_report(info: dict[str, Any], summary: dict[str, dict[str, Any]], runs: int,
                 baseline_cpu: float) -> None:
    print("\nCelery end to end (benchmarks/celery_e2e.py)")
    for key, value in info.items():
        print(f"  {key}: {value}")
    names = [n for n in info["peers"] if n in summary]
    for name in names:
        for note in summary[name]["notes"]:
            print(f"  ! {name}: {note}")
    spread = " (median (min..max) of the runs)" if runs > 1 else ""
    ours = [n for n in names if n.startswith("eventstore")]
    for title, metrics in FIGURES:
        print(f"\n{title}{spread}")
        print(f"  {'figure':<{LABEL}}{'peer':<23}{'value':>22}{'/ redis':>10}{'/ rabbitmq':>12}")
        for metric in metrics:
            label = metric.label + ("" if metric.higher_is_better else " (lower better)")
            shown = [n for n in names if metric.key in summary[n]]
            for i, name in enumerate(shown):
                r = q = ""
                if metric.ratio and name in ours:
                    r = ratio(summary, name, "redis", metric.key)
                    q = ratio(summary, name, "rabbitmq", metric.key)
                print(f"  {label if i == 0 else '':<{LABEL}}{name:<23}"
                      f"{cell(summary, name, metric.key, runs):>22}{r:>10}{q:>12}")
            if not shown:
                print(f"  {label:<{LABEL}}(not measured)")
    print(f"\n7. SQLite, the embedded default, against Redis{spread}")
    print(f"  {'figure':<32}{'eventstore+sqlite':>24}{'redis':>24}{'ratio':>10}")
    for key in SQLITE_ROWS:
        print(f"  {key:<32}{cell(summary, 'eventstore+sqlite', key, runs):>24}"
              f"{cell(summary, 'redis', key, runs):>24}"
              f"{ratio(summary, 'eventstore+sqlite', 'redis', key):>10}")
    print_targets(summary, baseline_cpu)


def targets(summary: dict[str, dict[str, Any]], baseline_cpu: float) -> list[dict[str, Any]]:
    """The issue's targets, on the medians: (what, value, bound, higher is better)."""
    def m(peer: str, key: str) -> float | None:
        return median(summary, peer, key)

    def times(factor: float, value: float | None) -> float | None:
        return None if value is None else factor * value

    es, sq = "eventstore+postgresql", "eventstore+sqlite"
    raw = m(es, "raw commit p50 ms")
    rows = [
        ("PostgreSQL drain with results >= Redis's", m(es, "drain results/s"),
         m("redis", "drain results/s"), True),
        ("PostgreSQL drain without results >= RabbitMQ's", m(es, "drain ignored/s"),
         m("rabbitmq", "drain ignored/s"), True),
        ("PostgreSQL start p50 <= 1.5x Redis's", m(es, "start p50 ms"),
         times(1.5, m("redis", "start p50 ms")), False),
        ("PostgreSQL result-ready p50 <= 1.5x Redis's", m(es, "result p50 ms"),
         times(1.5, m("redis", "result p50 ms")), False),
        ("PostgreSQL delay().get() round trips >= Redis's", m(es, "get()/s"),
         m("redis", "get()/s"), True),
        ("PostgreSQL delay() p50 <= raw commit p50 + 0.5 ms", m(es, "delay p50 ms"),
         None if raw is None else raw + 0.5, False),
        (f"PostgreSQL {PRODUCERS} producers >= Redis's {PRODUCERS}", m(es, "producers/s"),
         m("redis", "producers/s"), True),
        (f"PostgreSQL atomic {ATOMIC_BLOCK} >= 15,000/s", m(es, "atomic/s"), 15000.0, True),
        (f"PostgreSQL CPU/task with results <= {baseline_cpu:,.0f}/2 µs",
         m(es, "cpu results total us"), baseline_cpu / 2, False),
        ("SQLite publish >= Redis's", m(sq, "publish/s"), m("redis", "publish/s"), True),
        ("SQLite drain without results >= Redis's", m(sq, "drain ignored/s"),
         m("redis", "drain ignored/s"), True),
        ("SQLite drain with results >= Redis's", m(sq, "drain results/s"),
         m("redis", "drain results/s"), True),
    ]
    out = []
    for what, value, bound, higher in rows:
        met = None
        if value is not None and bound is not None:
            met = value >= bound if higher else value <= bound
        out.append({"target": what, "value": value, "bound": bound, "met": met})
    return out


def print_targets(summary: dict[str, dict[str, Any]], baseline_cpu: float) -> None:
    print("\ntargets (issue 15), on the medians")
    for row in targets(summary, baseline_cpu):
        verdict = {True: "met", False: "NOT met", None: "n/a (not measured)"}[row["met"]]
        value = "-" if row["value"] is None else number(row["value"])
        bound = "-" if row["bound"] is None else number(row["bound"])
        print(f"  {row['target']:<52}{value:>10} vs {bound:>10}   {verdict}")


# -- main -------------------------------------------------------------------------------


def parse_only(values: list[str] | None) -> list[str]:
    if not values:
        return list(PEERS)
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise SystemExit(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(PEERS)}")
    return [n for n in PEERS if n in names]


@contextlib.contextmanager
def terminated_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the finally blocks stop workers and drop schemas."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts (under 2 minutes)")
    parser.add_argument("--tiny", action="store_true", help="a handful of tasks (smoke test)")
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole measurement")
    parser.add_argument("--only", nargs="+", metavar="PEERS",
                        help=f"peers, comma- or space-separated: {', '.join(PEERS)}")
    parser.add_argument("--json", type=Path, metavar="PATH", help="save the raw numbers")
    parser.add_argument("--baseline-cpu-us", type=float, default=BASELINE_CPU_US,
                        help="CPU per task with results to halve (default: issue 15's "
                             "4440 + 1592 µs)")
    args = parser.parse_args()
    names = parse_only(args.only)
    counts = TINY if args.tiny else QUICK if args.quick else DEFAULT
    info = header(counts, names)
    workdir = Path(tempfile.mkdtemp(prefix="celery-e2e-"))
    runs: list[dict[str, dict[str, Any]]] = []
    began = time.monotonic()
    try:
        with terminated_as_interrupt():
            for number_ in range(args.runs):
                run = uuid.uuid4().hex[:8]
                print(f"run {number_ + 1} of {args.runs}", file=sys.stderr, flush=True)
                runs.append({})
                for name in names:
                    runs[-1][name] = measure_peer(name, run, counts, workdir)
    except KeyboardInterrupt:
        print("interrupted: stopping workers and dropping what was created", file=sys.stderr)
        return 130
    finally:
        stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    info["load average at the end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    info["took"] = f"{time.monotonic() - began:.0f} s"
    summary = summarise(runs)
    print_report(info, summary, args.runs, args.baseline_cpu_us)
    if args.json:
        args.json.write_text(json.dumps({
            "header": info, "runs": runs, "summary": summary,
            "targets": targets(summary, args.baseline_cpu_us),
        }, indent=2, default=str))
    failed = any("error" in row for run in runs for row in run.values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
