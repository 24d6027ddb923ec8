"""What a fault cost, counted from the event store and from the tasks' own side effects.

Every run of ``resultproj.effect`` appends a ``start`` line to the ledger
(:data:`resultproj.EFFECTS`) when it begins and a ``done`` line when it returns,
each naming the task, the claim it runs under and its pool process.  The store's
log says which worker took each claim, when, and until when its lease held.  From
both:

* **lost**: a task whose publish returned (or that is in the log although its
  publish raised) and that never finished a run, or whose message ended
  dead-lettered or discarded.  Must be 0.
* **re-runs**: every run of a task after its first.  A re-run is **explained** when
  the run before it was cut short by a fault the test caused, that is when that
  run's claim was held (taken, and its lease not run out) when

  - the worker that took it was killed (kill -9), or
  - a fault window began (a server restart, a read-only spell: its ack could not
    be written) -- or the claim was taken during the window;

  or when the claim is missing from the log and the run started before a *crash*
  window ended (a claim committed without waiting for the disk, lost by the crash).
  Anything else is **unexplained**: two runs under one claim, a lease taken from a
  healthy worker, a claim forgotten without a crash.  Must be 0.
* **re-runs after a recorded result**: explained re-runs whose task already had
  ``Succeeded`` in its stream when the re-run's claim was taken: the fault fell
  between the result and the ack.  Since issue 10, item 7 such a message is settled
  (``Discarded``, reason ``outcome recorded``), which is not a loss.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness import Broker
from resultproj import EFFECTS

from celery_eventstore import lifecycle as lc
from celery_eventstore.storage import EventStore, RecordedEvent


@dataclass(frozen=True)
class Window:
    """A spell (epoch seconds) the database was down or read-only; ``crash`` when it
    may have lost commits that did not wait for the disk."""

    start: float
    end: float
    crash: bool = False


@dataclass
class Faults:
    """What the test did to the system, for explaining re-runs."""

    #: Main process id of each worker killed with SIGKILL, and when.
    kills: dict[int, float] = field(default_factory=dict)
    windows: list[Window] = field(default_factory=list)

    def explain(self, claim: Claim | None, run: Run) -> bool:
        """Whether a fault cut short ``run``, which ran under ``claim`` (None: the
        claim is not in the log)."""
        if claim is None:
            return any(w.crash and run.started <= w.end for w in self.windows)
        killed_at = self.kills.get(claim.pid)
        if killed_at is not None and claim.holds(killed_at):
            return True
        return any(
            claim.claimed_at <= w.end and claim.lease_until >= w.start for w in self.windows
        )


@dataclass
class Claim:
    """One claim as the log tells it."""

    consumer: str
    claimed_at: float
    lease_until: float  # the last lease it was given (claim or renewal)

    @property
    def pid(self) -> int:
        """The worker's main process (consumer ids are ``host:pid:nonce``)."""
        return int(self.consumer.split(":")[-2])

    def holds(self, when: float) -> bool:
        return self.claimed_at <= when <= self.lease_until


@dataclass
class Run:
    task: str
    claim: str | None
    pid: int
    started: float
    done: bool = False


@dataclass
class Counts:
    tasks: int = 0
    lost: list[str] = field(default_factory=list)
    explained: int = 0
    after_result: int = 0
    unexplained: list[dict[str, Any]] = field(default_factory=list)
    refused: int = 0  # publishes that raised and are not in the log
    #: Tasks that finished a run but have no ``Succeeded`` in the log.
    no_result: list[str] = field(default_factory=list)
    #: The full story of every lost task and of every task finished without a
    #: result: its runs (ledger) and its stream (log).
    histories: dict[str, dict[str, Any]] = field(default_factory=dict)

    def line(self, scenario: str) -> str:
        refused = f", publishes refused {self.refused}" if self.refused else ""
        no_result = f", finished without a result {len(self.no_result)}" if self.no_result else ""
        return (
            f"faults: {scenario}: {self.tasks} tasks, lost {len(self.lost)}, "
            f"unexplained re-runs {len(self.unexplained)}, explained re-runs {self.explained} "
            f"(re-runs after a recorded result: {self.after_result}){refused}{no_result}"
        )

    def stories(self, tasks: Sequence[str], limit: int = 3) -> str:
        """What happened to the first ``limit`` of ``tasks`` (lost, or finished
        without a result), for a failure message."""
        return "\n".join(
            json.dumps({"task": task, **self.histories[task]}, indent=1, default=str)
            for task in tasks[:limit]
        )


# -- reading ---------------------------------------------------------------------


def ledger(broker: Broker) -> list[str]:
    """The lines every run of ``resultproj.effect`` wrote so far (a line being
    written as we read is left for the next read)."""
    path = broker.markers / EFFECTS
    return path.read_text().split("\n")[:-1] if path.exists() else []


def read_runs(lines: Iterable[str]) -> dict[str, list[Run]]:
    """The runs of each task, in the order they started."""
    runs: dict[str, list[Run]] = defaultdict(list)
    open_runs: dict[tuple[str, str | None, int], Run] = {}
    for line in lines:
        if not line.strip():
            continue
        entry = json.loads(line)
        key = (entry["task"], entry["claim"], entry["pid"])
        if entry["event"] == "start":
            run = Run(entry["task"], entry["claim"], entry["pid"], entry["time"])
            runs[run.task].append(run)
            open_runs[key] = run
        elif key in open_runs:
            open_runs.pop(key).done = True
    return runs


def read_log(store: EventStore) -> dict[str, list[RecordedEvent]]:
    """The whole log, by stream."""
    streams: dict[str, list[RecordedEvent]] = defaultdict(list)
    position = 0
    while batch := store.read_all(after=position, limit=5000):
        for record in batch:
            streams[record.stream].append(record)
        position = batch[-1].position
    return streams


def finished(broker: Broker, task_ids: Iterable[str]) -> int:
    """How many of ``task_ids`` finished a run so far."""
    runs = read_runs(ledger(broker))
    return sum(1 for t in task_ids if any(r.done for r in runs.get(t, ())))


def settle(
    broker: Broker, published: Sequence[str], failed: Sequence[str] = (), timeout: float = 90.0
) -> bool:
    """Wait until every task of ``published`` (and of ``failed`` that is in the log)
    finished a run and the queue holds nothing ready, scheduled or claimed; False
    after ``timeout`` s, or at once when no worker of ``broker`` is left running:
    the counts then say what is missing."""
    logged = set(read_log(broker.store)) if failed else set()
    expected = [*published, *(t for t in failed if t in logged)]
    deadline = time.monotonic() + timeout
    while True:
        runs = read_runs(ledger(broker))
        stats = broker.stats()
        idle = stats is None or (stats.ready, stats.scheduled, stats.claimed) == (0, 0, 0)
        if idle and all(any(r.done for r in runs.get(t, ())) for t in expected):
            return True
        if time.monotonic() > deadline or all(w.proc.poll() is not None for w in broker.workers):
            return False
        time.sleep(0.5)


# -- counting --------------------------------------------------------------------


def count(
    broker: Broker,
    published: Sequence[str],
    failed: Sequence[str] = (),
    faults: Faults | None = None,
) -> Counts:
    """Count lost tasks and re-runs of the tasks in ``published`` (their publish
    returned) and ``failed`` (their publish raised; counted only if in the log)."""
    return tally(
        read_runs(ledger(broker)), read_log(broker.store), published, failed, faults or Faults()
    )


def tally(
    runs: Mapping[str, list[Run]],
    streams: Mapping[str, list[RecordedEvent]],
    published: Sequence[str],
    failed: Sequence[str],
    faults: Faults,
) -> Counts:
    counts = Counts()
    landed = [t for t in failed if t in streams]
    counts.refused = len(failed) - len(landed)
    expected = [*published, *landed]
    counts.tasks = len(expected)
    for task in expected:
        stream, task_runs = streams.get(task, []), runs.get(task, [])
        if not any(r.done for r in task_runs) or any(_dropped(r.event) for r in stream):
            counts.lost.append(task)
            counts.histories[task] = history(task_runs, stream)
        claims = _claims(stream)
        succeeded = [r.recorded_at for r in stream if isinstance(r.event, lc.Succeeded)]
        if not succeeded and any(r.done for r in task_runs):
            counts.no_result.append(task)
            counts.histories[task] = history(task_runs, stream)
        for before, rerun in zip(task_runs, task_runs[1:], strict=False):
            explained = rerun.claim != before.claim and faults.explain(
                claims.get(before.claim or ""), before
            )
            if not explained:
                counts.unexplained.append({
                    "task": task,
                    "runs": [vars(r) for r in task_runs],
                    "log": [(r.type, getattr(r.event, "claim", None)) for r in stream],
                })
                continue
            counts.explained += 1
            again = claims.get(rerun.claim or "")
            if succeeded and again is not None and succeeded[0] < again.claimed_at:
                counts.after_result += 1
    return counts


def history(runs: Sequence[Run], stream: Sequence[RecordedEvent]) -> dict[str, Any]:
    """A task's runs and every event of its stream, with when each was recorded."""
    return {
        "runs": [vars(r) for r in runs],
        "log": [
            {"position": r.position, "at": r.recorded_at, "type": r.type,
             **{k: v for k, v in vars(r.event).items() if k != "message"}}
            for r in stream
        ],
    }


def _dropped(event: lc.Event) -> bool:
    """A message that will not run: dead-lettered, or discarded -- unless it was
    settled because its task's outcome was recorded (the worker died after the
    result, before the ack: issue 10, item 7)."""
    if isinstance(event, lc.Discarded):
        return event.reason != "outcome recorded"
    return isinstance(event, lc.DeadLettered)


def _claims(stream: Sequence[RecordedEvent]) -> dict[str, Claim]:
    claims: dict[str, Claim] = {}
    for record in stream:
        event = record.event
        if isinstance(event, lc.Claimed):
            claims[event.claim] = Claim(event.consumer, record.recorded_at, event.lease_until)
        elif isinstance(event, lc.LeaseRenewed) and event.claim in claims:
            claims[event.claim].lease_until = max(claims[event.claim].lease_until,
                                                  event.lease_until)
    return claims
