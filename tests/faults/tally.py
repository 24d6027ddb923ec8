"""What a fault cost, counted from the event store and from the tasks' own side effects.

Every run of ``resultproj.effect`` appends a ``start`` line to the ledger
(:data:`resultproj.EFFECTS`) when it begins and a ``done`` line when it returns,
each naming the task, the claim it runs under and its pool process.  The store's
log says which worker took each claim, when, and how the claim ended.  From both:

* **lost**: a task whose publish returned (or that is in the log although its
  publish raised) and that never finished a run, or whose message ended
  dead-lettered or discarded.  Must be 0.
* **re-runs**: every run of a task after its first.  A re-run is **explained** when
  the run before it was cut short by a fault the test caused:

  - its claim was taken by a worker the test killed (kill -9), or
  - its claim was taken before a fault window ended (a server restart, a read-only
    spell: the ack could not be written), or the claim is missing from the log and
    the run started before the window ended (a claim committed without waiting for
    the disk, lost by the server's crash).

  Anything else is **unexplained** (two runs under one claim, a live lease taken
  from a healthy worker, ...).  Must be 0.
* **re-runs after a recorded result**: explained re-runs whose task already had
  ``Succeeded`` in its stream when the re-run's claim was taken -- the crash fell
  between the result and the ack (issue 10, item 7: to be settled, not run again).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness import Broker
from resultproj import EFFECTS

from celery_eventstore import lifecycle as lc
from celery_eventstore.storage import EventStore, RecordedEvent


@dataclass
class Faults:
    """What the test did to the system, for explaining re-runs."""

    #: Main process ids of the workers killed with SIGKILL.
    killed: set[int] = field(default_factory=set)
    #: (start, end) epoch seconds of each spell the database was down or read-only.
    windows: list[tuple[float, float]] = field(default_factory=list)

    def killed_claim(self, consumer: str) -> bool:
        return any(f":{pid}:" in consumer for pid in self.killed)

    def before_window_end(self, when: float) -> bool:
        return any(when <= end for _, end in self.windows)


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

    def line(self, scenario: str) -> str:
        refused = f", publishes refused {self.refused}" if self.refused else ""
        return (
            f"faults: {scenario}: {self.tasks} tasks, lost {len(self.lost)}, "
            f"unexplained re-runs {len(self.unexplained)}, explained re-runs {self.explained}, "
            f"re-runs after a recorded result {self.after_result}{refused}"
        )


def read_runs(ledger: Iterable[str]) -> dict[str, list[Run]]:
    """The runs of each task, in the order they started."""
    runs: dict[str, list[Run]] = defaultdict(list)
    open_runs: dict[tuple[str, str | None, int], Run] = {}
    for line in ledger:
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


def ledger(broker: Broker) -> list[str]:
    """The lines every run of ``resultproj.effect`` wrote so far."""
    path = broker.markers / EFFECTS
    return path.read_text().splitlines() if path.exists() else []


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


def count(
    broker: Broker,
    published: Sequence[str],
    failed: Sequence[str] = (),
    faults: Faults | None = None,
) -> Counts:
    """Count lost tasks and re-runs of the tasks in ``published`` (their publish
    returned) and ``failed`` (their publish raised; counted only if in the log)."""
    faults = faults or Faults()
    runs, streams = read_runs(ledger(broker)), read_log(broker.store)
    counts = Counts()
    landed = [t for t in failed if t in streams]
    expected = [*published, *landed]
    counts.refused = len(failed) - len(landed)
    counts.tasks = len(expected)
    for task in expected:
        stream, task_runs = streams.get(task, []), runs.get(task, [])
        if not any(r.done for r in task_runs) or any(
            isinstance(r.event, (lc.DeadLettered, lc.Discarded)) for r in stream
        ):
            counts.lost.append(task)
        claims = {r.event.claim: r for r in stream if isinstance(r.event, lc.Claimed)}
        succeeded = [r.recorded_at for r in stream if isinstance(r.event, lc.Succeeded)]
        for before, rerun in zip(task_runs, task_runs[1:], strict=False):
            if rerun.claim == before.claim or not _explained(before, claims, faults):
                counts.unexplained.append({
                    "task": task,
                    "runs": [vars(r) for r in task_runs],
                    "log": [(r.type, getattr(r.event, "claim", None)) for r in stream],
                })
                continue
            counts.explained += 1
            claimed = claims.get(rerun.claim or "")
            if succeeded and claimed is not None and succeeded[0] < claimed.recorded_at:
                counts.after_result += 1
    return counts


def _explained(before: Run, claims: dict[str, RecordedEvent], faults: Faults) -> bool:
    """Whether the fault explains why the run ``before`` a re-run did not settle."""
    claimed = claims.get(before.claim or "")
    if claimed is None:  # its claim never reached the disk: only a server crash does that
        return faults.before_window_end(before.started)
    assert isinstance(claimed.event, lc.Claimed)
    return faults.killed_claim(claimed.event.consumer) or faults.before_window_end(
        claimed.recorded_at
    )
