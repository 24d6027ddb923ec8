"""Workers killed with SIGKILL in the middle of a drain: nothing is lost, and every
task that runs twice ran first on a worker that was killed.

Two prefork workers drain a queue of ``resultproj.effect`` tasks (acks_late, the
event store as result backend); four times the test kills one of them -- main
process and pool processes at once, as ``kill -9`` of a container would -- and
starts a replacement.  The killed workers' claims come back when their leases run
out.  The counts come from the store's log and the tasks' own ledger (:mod:`tally`).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from harness import Broker, Worker, wait_for
from tally import Faults, count, finished, settle

KILLS = 4
TASKS = {"postgresql": 2000, "sqlite": 1000}
#: Long enough that a kill finds tasks running, short enough to drain quickly.
TASK_SECONDS = 0.02
#: Lease length: how long a killed worker's claims wait before they come back.
LEASE_SECONDS = 3
TIMEOUT = 120.0


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["sqlite", "postgresql"], indirect=True)
def test_kill_9_during_a_drain(broker: Broker, start_worker: Any, result_app: Any) -> None:
    broker.options["visibility_timeout"] = LEASE_SECONDS
    total = TASKS[broker.dialect]
    effect = result_app.tasks["resultproj.effect"]
    published = [effect.apply_async(kwargs={"sleep": TASK_SECONDS}).id for _ in range(total)]

    faults = Faults()
    workers: list[Worker] = [start_worker(app="resultproj") for _ in range(2)]
    for kill in range(1, KILLS + 1):
        # Spread the kills over the drain, each while both workers are busy.
        due = total * kill // (KILLS + 2)
        wait_for(lambda due=due: finished(broker, published) >= due, TIMEOUT,
                 f"{due} tasks to finish before kill {kill}")  # fmt: skip
        victim = workers.pop(0)
        victim.kill()
        faults.kills[victim.proc.pid] = time.time()
        workers.append(start_worker(app="resultproj"))

    settle(broker, published, timeout=TIMEOUT)
    counts = count(broker, published, faults=faults)
    print(counts.line(f"kill-9 x{KILLS} ({broker.dialect})"))
    assert counts.lost == [], counts.lost[:10]
    assert counts.unexplained == [], counts.unexplained[:3]
    assert counts.explained > 0, "no kill found a task running: the test proved nothing"
