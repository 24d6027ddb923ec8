"""Acceptance harness: a broker per dialect and real Celery workers as subprocesses.

The fixtures are re-exported by conftest.py.

``broker`` is parametrized over a SQLite file and a fresh PostgreSQL schema.
``start_worker`` runs ``python -m celery -A proj worker`` (prefork) in its own
process group, with the broker URL, transport options and marker directory in
its environment, and waits for its "ready" line.  Workers are stopped at
teardown (SIGTERM, then SIGKILL for the whole group); when a test failed, the
tail of each worker's log is printed.

A prefork worker takes two to three seconds to shut down warmly.  After a test
that passed, its workers get SIGTERM at once and the wait for them (and the
broker's cleanup after it) runs in the background while the next test starts;
the session waits for every one of them at its end and reports any error.

Tests never sleep for a result: they poll the event store or the marker files
with a deadline (:func:`wait_for`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import proj
import pytest
import sqlalchemy as sa

from celery_eventstore import stores
from celery_eventstore.storage import EventStore

HERE = Path(__file__).resolve().parent
T = TypeVar("T")

#: Short leases and fast polls: the tests wait for leases and ETAs to run out.
DEFAULT_OPTIONS: dict[str, Any] = {"visibility_timeout": 4, "polling_interval": 0.2}
READY_TIMEOUT = 40.0
STOP_TIMEOUT = 15.0
LOG_TAIL_LINES = 80


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    node = request.node
    return any(
        getattr(getattr(node, f"rep_{when}", None), "failed", False) for when in ("setup", "call")
    )


def queue_drained(stats: Any) -> bool:
    """Whether a queue's stats (``Broker.stats()``, read once) show nothing waiting
    or in flight; None, a queue with no row left, is drained too."""
    return stats is None or stats.ready + stats.claimed == 0


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    interval: float = 0.1,
    show: Callable[[], Any] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s.

    ``show`` says what to report on a timeout (default: the last value).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            seen = show() if show is not None else value
            pytest.fail(f"timed out after {timeout}s waiting for {what} (saw: {seen!r})")
        time.sleep(interval)


class Producer(threading.Thread):
    """Publishes ``task`` with ``kwargs`` every ``interval`` s, with Celery's default
    publish retry, and keeps what became of each publish: an application's view of
    a broker fault."""

    def __init__(
        self, app: Any, task: str, kwargs: dict[str, Any] | None = None, interval: float = 0.05
    ) -> None:
        super().__init__(name="fault-producer", daemon=True)
        self.task = app.tasks[task]
        self.kwargs = kwargs or {}
        self.interval = interval
        #: Task ids whose publish returned.
        self.published: list[str] = []
        #: Task ids whose publish raised, with what it raised.
        self.failed: list[tuple[str, BaseException]] = []
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.is_set():
            task_id = uuid.uuid4().hex
            try:
                self.task.apply_async(kwargs=self.kwargs, task_id=task_id)
            except Exception as exc:  # what an application sees of the fault
                self.failed.append((task_id, exc))
            else:
                self.published.append(task_id)
            self._stopped.wait(self.interval)

    def stop(self, timeout: float = 60.0) -> None:
        self._stopped.set()
        self.join(timeout)


class Broker:
    """One database for one test: its URL, transport options, store and app."""

    def __init__(self, dialect: str, db_url: str, schema: str | None, tmp_path: Path) -> None:
        self.dialect = dialect
        self.db_url = db_url
        self.schema = schema
        self.tmp_path = tmp_path
        self.markers = tmp_path / "markers"
        self.markers.mkdir()
        #: Transport options; a test may change them before it starts an app or worker.
        self.options: dict[str, Any] = dict(DEFAULT_OPTIONS)
        self.store = EventStore(db_url, schema=schema)
        self.store.migrate()
        self._app: Any = None
        #: Every worker started on this broker; stopped before the broker goes.
        self.workers: list[Worker] = []

    @property
    def url(self) -> str:
        return f"eventstore+{self.db_url}"

    def transport_options(self) -> dict[str, Any]:
        extra = {"schema": self.schema} if self.schema else {}
        return {**self.options, **extra}

    @property
    def app(self) -> Any:
        """The test process's Celery app (publisher, control client)."""
        if self._app is None:
            self._app = proj.make_app(self.url, self.transport_options())
        return self._app

    # -- reading what happened ---------------------------------------------

    def events(self, task_id: str) -> list[Any]:
        return self.store.read_stream(task_id)

    def types(self, task_id: str) -> list[str]:
        return [r.type for r in self.events(task_id)]

    def runs(self, name: str) -> list[dict[str, Any]]:
        """The JSON lines a task wrote to marker file ``name``."""
        path = self.markers / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wait_for_event(self, task_id: str, event_type: str, timeout: float = 20.0) -> list[str]:
        return wait_for(
            lambda: (t := self.types(task_id)) and event_type in t and t,
            timeout,
            f"{event_type} in stream {task_id}",
            show=lambda: self.types(task_id),
        )

    def wait_for_runs(self, task_id: str, events: list[str], timeout: float = 20.0) -> None:
        """Wait until marker file ``task_id`` holds exactly these ``event`` fields."""
        wait_for(
            lambda: [r["event"] for r in self.runs(task_id)] == events,
            timeout,
            f"task {task_id} to record {events}",
            show=lambda: {"runs": self.runs(task_id), "stream": self.types(task_id)},
        )

    def stats(self, queue: str = "celery") -> Any:
        for s in self.store.queue_stats():
            if s.queue == queue:
                return s
        return None

    def close(self) -> None:
        if self._app is not None:
            # Celery's app.close() leaves the pooled broker connections open.
            self._app.pool.force_close_all()
            self._app.close()
        self.store.close()

        # The transport keeps one store per URL and options in the process: drop ours.
        def ours(key: tuple[str, tuple[tuple[str, Any], ...]]) -> bool:
            url, options = key
            return self.db_url in url and dict(options).get("schema") == self.schema

        with stores._lock:
            for key in [k for k in stores._stores if ours(k)]:
                stores._stores.pop(key).close()


def make_broker(
    url: str, tmp_path: Path, prefix: str = "acc"
) -> tuple[Broker, Callable[[], None]]:
    """A :class:`Broker` on database ``url`` (a fresh schema on PostgreSQL), and
    the cleanup that stops its workers, closes it and drops the schema."""
    engine: sa.Engine | None = None
    schema: str | None = None
    if url.startswith("sqlite"):
        b = Broker("sqlite", url, None, tmp_path)
    else:
        schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
        # No pool: a connection kept between set-up and clean-up would not survive
        # a test that restarts the server.  (prepare_threshold in a URL is the
        # store's to read, not plain SQLAlchemy's.)
        plain = sa.make_url(url).difference_update_query(["prepare_threshold"])
        engine = sa.create_engine(plain, poolclass=sa.pool.NullPool)
        with engine.begin() as conn:
            conn.execute(sa.schema.CreateSchema(schema))
        b = Broker("postgresql", url, schema, tmp_path)

    def cleanup() -> None:
        try:
            for worker in b.workers:
                worker.stop()
            b.close()
        finally:
            if engine is not None:
                with engine.begin() as conn:
                    conn.execute(sa.schema.DropSchema(schema, cascade=True))
                engine.dispose()

    return b, cleanup


def reaper_for(request: pytest.FixtureRequest, dialect: str) -> Any:
    """The session's reaper (tests/conftest.py) for a broker of ``dialect``."""
    name = "postgresql_reaper" if dialect == "postgresql" else "reaper"
    return request.getfixturevalue(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    reaper = reaper_for(request, request.param)
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'broker.db'}"
    else:
        url = request.getfixturevalue("postgresql_url")
    yield from open_broker(request, tmp_path, reaper, url)


def open_broker(
    request: pytest.FixtureRequest, tmp_path: Path, reaper: Any | None, url: str
) -> Iterator[Broker]:
    """The body of a ``broker`` fixture on database ``url`` (a fresh schema on
    PostgreSQL), for modules that override ``broker`` with a database of their own.

    Without a ``reaper`` the workers are stopped before the fixture returns (for a
    database that goes away with the test).
    """
    b, cleanup = make_broker(url, tmp_path)
    try:
        yield b
    finally:
        if reaper is not None and b.workers and not _failed(request):
            for worker in b.workers:
                worker.terminate()
            reaper.submit(cleanup)
        else:
            cleanup()


@pytest.fixture
def result_app(broker: Broker) -> Iterator[Any]:
    """The test process's ``resultproj`` app: broker and result backend on ``broker``."""
    import resultproj

    app = resultproj.make_app(broker.url, broker.transport_options())
    yield app
    backend = getattr(app._local, "backend", None)
    listener = getattr(getattr(backend, "_local", None), "listener", None)
    if listener is not None:  # the result waiter's LISTEN connection
        listener.close()
    app.pool.force_close_all()
    app.close()


@pytest.fixture
def current_result_app(result_app: Any) -> Iterator[Any]:
    """``result_app`` as Celery's current app for the test, as an application's one
    app is (``delay()`` outside any app context publishes through it)."""
    from celery import current_app

    previous = current_app._get_current_object()
    result_app.set_current()
    yield result_app
    previous.set_current()


class Worker:
    """``celery -A <app> worker`` (``proj`` by default) in a process group of its own;
    prefork with two processes unless ``args`` say otherwise (``-P``, ``-c``)."""

    def __init__(self, broker: Broker, name: str, args: list[str], app: str = "proj") -> None:
        self.name = name
        self.terminating = False
        self.log_path = broker.tmp_path / f"{name}.log"
        env = dict(os.environ)
        env.update(
            {
                proj.BROKER_ENV: broker.url,
                proj.OPTIONS_ENV: json.dumps(broker.transport_options()),
                proj.MARKERS_ENV: str(broker.markers),
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(HERE), env.get("PYTHONPATH", "")) if p
                ),
                "PYTHONUNBUFFERED": "1",
            }
        )
        # Celery monkey-patches for eventlet/gevent by the *first* -P it finds.
        pool = [] if "-P" in args else ["-P", "prefork"]
        command = [
            sys.executable, "-m", "celery", "-A", app, "worker",
            *pool, "-c", "2", "-l", "info",
            "--without-gossip", "--without-mingle",
            "-n", f"{name}@%h", *args,
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command,
                cwd=HERE,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def received(self, task_id: str) -> bool:
        return f"[{task_id}] received" in self.log()

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"worker {self.name} exited with {self.proc.returncode}:\n{self.log()}",
                    pytrace=False,
                )
            return " ready." in self.log()

        wait_for(ready, READY_TIMEOUT, f"worker {self.name} to be ready", interval=0.05)

    def terminate(self) -> None:
        """Ask for a warm shutdown (once)."""
        if self.proc.poll() is None and not self.terminating:
            self.terminating = True
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes (the whole process group)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL for the process group after ``STOP_TIMEOUT``."""
        self.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        self.kill()  # also reaps pool processes a dead main process left behind

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


@pytest.fixture
def start_worker(request: pytest.FixtureRequest, broker: Broker) -> Iterator[Callable[..., Worker]]:
    """``start_worker(*extra_args, app="proj")`` starts a worker and returns once it
    is ready.  ``app`` names the module ``celery -A`` loads (e.g. ``resultproj``).

    The broker fixture stops the workers; after a failure that happens here, first,
    so that the logs printed are complete.
    """
    workers = broker.workers

    def start(*args: str, app: str = "proj") -> Worker:
        worker = Worker(broker, f"w{len(workers) + 1}-{uuid.uuid4().hex[:6]}", list(args), app)
        workers.append(worker)
        worker.wait_ready()
        return worker

    yield start
    if _failed(request):
        for worker in workers:
            worker.stop()
        for worker in workers:
            print(f"\n----- log of worker {worker.name} (last {LOG_TAIL_LINES} lines) -----")
            print(worker.tail())


@pytest.fixture
def worker(start_worker: Callable[..., Worker]) -> Worker:
    """One running worker with the default options."""
    return start_worker()
