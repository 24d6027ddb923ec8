"""What monitoring and result waiters see of verdicts the store makes itself, with a
real worker (``celery -A resultproj worker -E``) on SQLite and on PostgreSQL
(issue 14, items 4, 7 and 8).

* An unregistered task: ``get()`` raises ``NotRegistered`` on both dialects, every
  time; the message is a dead letter that keeps the worker's verdict.
* A revoke keeps its reason: ``TaskRevokedError('customer cancelled')``.
* ``inspect scheduled`` lists the ETA tasks the store holds for the worker's
  queues, as Celery's own integration test expects; ``inspect reserved`` the
  messages claimed and not started.
* ``celery events`` receives ``task-revoked`` (revoke, expiry) and
  ``task-rejected`` (purge) for tasks no worker ever saw.
* Recorded times never run backwards within any stream of the run.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import resultproj
from celery.exceptions import NotRegistered, TaskRevokedError
from click.testing import CliRunner
from harness import LOG_TAIL_LINES, Broker, Worker, _failed, make_broker, reaper_for, wait_for
from kombu.utils.url import maybe_sanitize_url

from celery_eventstore import lifecycle as lc
from celery_eventstore.cli import eventstore
from celery_eventstore.monitoring import announce
from celery_eventstore.replay import replay

TIMEOUT = 30.0


class Run:
    def __init__(self, broker: Broker, worker: Worker, app: Any) -> None:
        self.broker = broker
        self.worker = worker
        self.app = app
        self.events: list[dict[str, Any]] = []
        self._receiver: Any = None

    def task(self, name: str) -> Any:
        return self.app.tasks[f"resultproj.{name}"]

    @property
    def node(self) -> str:
        return f"{self.worker.name}@{socket.gethostname()}"

    def inspect(self) -> Any:
        """An inspector that returns as soon as the worker answers."""
        return self.app.control.inspect(timeout=10, destination=[self.node])

    def cli(self, *args: str, code: int = 0) -> str:
        options = ["--url", self.broker.db_url]
        if self.broker.schema:
            options += ["--schema", self.broker.schema]
        result = CliRunner().invoke(eventstore, [*options, *args], catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result.output

    def listen(self) -> None:
        """Capture Celery events as ``celery events`` does, in a thread."""
        ready = threading.Event()

        def capture() -> None:
            with self.app.connection_for_read() as conn:
                self._receiver = self.app.events.Receiver(conn, handlers={"*": self._got})
                ready.set()
                self._receiver.capture(limit=None, timeout=None, wakeup=False)

        threading.Thread(target=capture, daemon=True, name="event-capture").start()
        assert ready.wait(TIMEOUT)
        wait_for(lambda: self.broker.store.bindings("celeryev"), TIMEOUT,
                 "the event receiver's queue")

    def _got(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True

    def events_of(self, task_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("uuid") == task_id]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    reaper = reaper_for(request, request.param)
    tmp_path = tmp_path_factory.mktemp(f"verdicts-{request.param}")
    url = (
        f"sqlite:///{tmp_path / 'broker.db'}" if request.param == "sqlite"
        else request.getfixturevalue("postgresql_url")
    )
    broker, cleanup = make_broker(url, tmp_path, prefix="accv")
    app = made = None
    try:
        worker = Worker(broker, f"v-{uuid.uuid4().hex[:6]}", ["-E"], app="resultproj")
        broker.workers.append(worker)
        worker.wait_ready()
        app = resultproj.make_app(broker.url, broker.transport_options())
        made = Run(broker, worker, app)
        made.listen()
        yield made
    except BaseException:
        for w in broker.workers:
            print(f"\n----- log of worker {w.name} -----\n{w.tail()}")
        raise
    finally:
        if made is not None:
            made.stop()
        if app is not None:
            app.pool.force_close_all()
            app.close()
        for w in broker.workers:
            w.terminate()
        reaper.submit(cleanup)


@pytest.fixture(autouse=True)
def _worker_log_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "run" in request.fixturenames and _failed(request):
        worker = request.getfixturevalue("run").worker
        print(f"\n----- log of worker {worker.name} (last {LOG_TAIL_LINES} lines) -----")
        print(worker.tail())


# -- item 9 ---------------------------------------------------------------------------


def test_the_worker_banner_shows_the_result_backend_with_its_prefix(run: Run) -> None:
    (line,) = [x for x in run.worker.log().splitlines() if ".> results:" in x]
    shown = maybe_sanitize_url(run.broker.db_url)  # a password is masked
    assert line.split(".> results:")[1].strip() == f"eventstore+{shown}"


# -- item 8 ---------------------------------------------------------------------------


def test_an_unregistered_task_fails_with_not_registered_every_time(run: Run) -> None:
    results = [run.app.send_task("resultproj.never_registered", args=(n,)) for n in range(5)]
    for result in results:
        with pytest.raises(NotRegistered, match="resultproj.never_registered"):
            result.get(timeout=TIMEOUT)
        # The message is a dead letter; the history has the worker's verdict first.
        types = run.broker.wait_for_event(result.id, "DeadLettered")
        assert types[-2:] == ["Failed", "DeadLettered"], types
        assert run.app.AsyncResult(result.id).state == "FAILURE"
    dead = {d.stream: d.reason for d in run.broker.store.dead_letters()}
    assert all(dead.get(r.id) == "rejected by the consumer" for r in results)


# -- item 7 ---------------------------------------------------------------------------


def test_a_revoke_keeps_its_reason_and_monitors_see_it(run: Run) -> None:
    result = run.task("add").apply_async((1, 2), countdown=60)
    run.broker.wait_for_event(result.id, "Published")
    assert run.cli("revoke", result.id, "--reason", "customer cancelled").startswith(
        f"revoked {result.id}"
    )
    with pytest.raises(TaskRevokedError) as raised:
        result.get(timeout=TIMEOUT)
    assert raised.value.args == ("customer cancelled",)
    revoked = wait_for(lambda: run.events_of(result.id), TIMEOUT, "a task-revoked event")
    assert [(e["type"], e["expired"], e["terminated"]) for e in revoked] == [
        ("task-revoked", False, False)
    ]


def test_an_expired_task_is_revoked_for_monitors_too(run: Run) -> None:
    result = run.task("add").apply_async((1, 2), countdown=1, expires=0.5)
    with pytest.raises(TaskRevokedError) as raised:
        result.get(timeout=TIMEOUT)
    assert raised.value.args == ("expired",)
    revoked = wait_for(lambda: run.events_of(result.id), TIMEOUT, "a task-revoked event")
    assert [(e["type"], e["expired"]) for e in revoked] == [("task-revoked", True)]


def test_a_purged_task_is_rejected_for_monitors(run: Run) -> None:
    result = run.task("add").apply_async((1, 2), queue="nobody-reads")
    run.broker.wait_for_event(result.id, "Published")
    with run.app.connection_for_write() as conn:
        assert conn.default_channel.queue_purge("nobody-reads") == 1
    rejected = wait_for(lambda: run.events_of(result.id), TIMEOUT, "a task-rejected event")
    assert [(e["type"], e["requeue"]) for e in rejected] == [("task-rejected", False)]


def test_a_dead_letter_after_the_claim_budget_fails_for_monitors(run: Run) -> None:
    """A consumer outside the worker (here the test's own store, announcing as the
    CLI does) loses a lease after the task started; the next claim spends the budget."""
    store = run.broker.store
    announce(store, run.broker.transport_options())
    result = run.task("add").apply_async((1, 2), queue="budget")
    run.broker.wait_for_event(result.id, "Published")
    (claimed,) = store.claim(["budget"], 1, "lost-worker", 0.05)
    store.execute(result.id, lc.Start(worker="lost@host", claim=claimed.claim))
    wait_for(lambda: store.claim(["budget"], 1, "next-worker", 30, max_claims=1) == []
             and "DeadLettered" in run.broker.types(result.id), TIMEOUT, "the dead letter")
    failed = wait_for(lambda: [e for e in run.events_of(result.id) if e["type"] == "task-failed"],
                      TIMEOUT, "a task-failed event")
    assert failed[0]["exception"].startswith("TaskDeadLettered('1 run ended without")
    assert failed[0]["hostname"].startswith("eventstore@")


def test_inspect_scheduled_lists_the_eta_tasks_the_store_holds(run: Run) -> None:
    """Celery's own t/integration/test_inspect.py::test_scheduled, on this broker."""
    exec_time = datetime.now(timezone.utc) + timedelta(seconds=30)
    res = run.task("add").apply_async([1], {"y": 3}, eta=exec_time)
    run.broker.wait_for_event(res.id, "Published")
    answers = run.inspect().scheduled()
    assert answers is not None and len(answers) == 1
    ((node, listed),) = answers.items()
    assert node == run.node
    mine = [entry for entry in listed if entry["request"]["id"] == res.id]
    assert mine == [{
        "eta": exec_time.strftime("%Y-%m-%dT%H:%M:%S.%f") + "+00:00",
        "priority": 6,
        "request": {
            "id": res.id,
            "name": "resultproj.add",
            "args": [1],
            "kwargs": {"y": 3},
            "type": "resultproj.add",
            "hostname": node,
            "time_start": None,
            "acknowledged": False,
            "delivery_info": {
                "exchange": "", "routing_key": "celery", "priority": 0, "redelivered": False,
            },
            "worker_pid": None,
        },
    }]
    run.cli("revoke", res.id)  # leave nothing due behind
    wait_for(lambda: not any(e["request"]["id"] == res.id
                             for e in (run.inspect().scheduled() or {}).get(node, [])),
             TIMEOUT, "the revoked task to leave the list")


def test_inspect_reserved_lists_the_claimed_messages_not_started(run: Run) -> None:
    hold = run.task("hold")
    running = [hold.apply_async((6,)) for _ in range(2)]  # the two pool processes
    for r in running:
        run.broker.wait_for_event(r.id, "Started")
    waiting = hold.apply_async((0,))

    def reserved_ids() -> list[str]:
        answers = run.inspect().reserved() or {}
        return [req["id"] for reqs in answers.values() for req in reqs]

    assert waiting.id in wait_for(reserved_ids, TIMEOUT, "the waiting task to be reserved")
    assert "Claimed" in run.broker.types(waiting.id)
    assert "Started" not in run.broker.types(waiting.id)
    waiting.get(timeout=TIMEOUT)


# -- item 5 ---------------------------------------------------------------------------


def test_replay_equals_the_live_queues_at_each_snapshot_of_a_run(run: Run) -> None:
    """Snapshots of the live counts while a worker runs, each with the log position
    it was taken at (read before and after: taken only while the log stood still),
    equal the queues replayed from the log at those positions."""
    store = run.broker.store
    snapshots: list[tuple[int, dict[str, dict[str, int]]]] = []

    def snapshot() -> None:
        def log_mark() -> tuple[int, int]:
            # The last position, and how many events are committed: on PostgreSQL a
            # position is taken at insert, so a transaction still open (an ack) can
            # commit below the last position -- the count sees it, the position not.
            return store.last_position(), len(store.read_all(after=0, limit=1_000_000))

        def still() -> tuple[int, dict[str, dict[str, int]]] | None:
            before = log_mark()
            counts = {q.queue: {"ready": q.ready, "scheduled": q.scheduled,
                                "claimed": q.claimed, "dead": q.dead}
                      for q in store.queue_stats()}
            time.sleep(0.3)  # long enough for a transaction in flight to commit
            return (before[0], counts) if log_mark() == before else None

        snapshots.append(wait_for(still, TIMEOUT, "a moment the log stands still",
                                  interval=0.02))

    snapshot()
    later = run.task("add").apply_async((1, 1), countdown=120)
    parked = [run.task("add").apply_async((n, 1), queue="parked") for n in range(2)]
    snapshot()
    hold = run.task("hold")
    running = [hold.apply_async((3,)) for _ in range(2)]
    for r in running:
        run.broker.wait_for_event(r.id, "Started")
    snapshot()
    unknown = run.app.send_task("resultproj.not_here")
    run.broker.wait_for_event(unknown.id, "DeadLettered")
    snapshot()
    for r in running:
        r.get(timeout=TIMEOUT)
        run.broker.wait_for_event(r.id, "Acked")
    run.cli("revoke", later.id)
    snapshot()

    assert len({position for position, _ in snapshots}) == len(snapshots)
    for position, counts in snapshots:
        replayed = {q.queue: q.counts() for q in replay(store, position=position).queues}
        assert replayed == counts, position
    # What the replay names: the parked tasks were waiting, the holds in flight.
    middle = replay(store, position=snapshots[2][0])
    queues = {q.queue: q for q in middle.queues}
    assert sorted(queues["parked"].ready) == sorted(r.id for r in parked)
    assert sorted(t for t, _ in queues["celery"].in_flight) == sorted(r.id for r in running)
    assert all(worker.startswith(socket.gethostname()) for _, worker in
               queues["celery"].in_flight)
    assert queues["celery"].scheduled == [later.id]
    with run.app.connection_for_write() as conn:
        conn.default_channel.queue_purge("parked")


# -- item 4 ---------------------------------------------------------------------------


def test_recorded_times_never_run_backwards_in_any_stream(run: Run) -> None:
    results = [run.task("add").delay(n, 1) for n in range(20)]
    for r in results:
        r.get(timeout=TIMEOUT)
    last: dict[str, float] = defaultdict(float)
    after = 0
    while page := run.broker.store.read_all(after=after, limit=1000):
        for rec in page:
            assert rec.recorded_at >= last[rec.stream], (rec.stream, rec.type)
            last[rec.stream] = rec.recorded_at
        after = page[-1].position
    # Each finished task's timeline reads in order: claimed before started.
    for r in results:
        recs = run.broker.events(r.id)
        claimed = next(x for x in recs if isinstance(x.event, lc.Claimed))
        started = next(x for x in recs if isinstance(x.event, lc.Started))
        assert claimed.recorded_at <= started.recorded_at
