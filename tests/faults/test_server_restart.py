"""PostgreSQL crashes and comes back in the middle of a drain: the workers reconnect
by themselves, nothing is lost, and every task that runs twice held a claim from
before the crash.

``pg_ctl stop -m immediate`` is a crash: no checkpoint, every client cut, recovery
on the next start.  The workers keep the store's default ``async_commit``, so a
crash can lose claims and acks committed in the last moments before it (never a
publish or a result); what that costs is a re-run of a task that held a claim then,
counted as explained.  The counts come from the store's log and the tasks' own
ledger (:mod:`tally`).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from harness import Broker, wait_for
from pgserver import EmbeddedPostgres
from tally import Faults, Window, count, finished, settle

TASKS = 1000
TASK_SECONDS = 0.02
#: How long the server stays down: the workers see failed reconnects meanwhile.
DOWN_SECONDS = 2.0
TIMEOUT = 120.0


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["postgresql"], indirect=True)
def test_server_crash_and_restart_during_a_drain(
    broker: Broker, pg_server: EmbeddedPostgres, start_worker: Any, result_app: Any
) -> None:
    effect = result_app.tasks["resultproj.effect"]
    published = [effect.apply_async(kwargs={"sleep": TASK_SECONDS}).id for _ in range(TASKS)]
    workers = [start_worker(app="resultproj") for _ in range(2)]

    faults = Faults()
    wait_for(lambda: finished(broker, published) >= TASKS // 3, TIMEOUT,
             "a third of the tasks to finish before the crash")  # fmt: skip
    start = time.time()
    pg_server.halt("immediate")
    time.sleep(DOWN_SECONDS)
    pg_server.resume()
    faults.windows.append(Window(start, time.time(), crash=True))

    settled = settle(broker, published, timeout=TIMEOUT)
    counts = count(broker, published, faults=faults)
    print(counts.line("postgresql restart -m immediate"), f"(window {faults.windows})")
    if counts.no_result:  # a result write refused while the server was down
        print(counts.stories(counts.no_result))
    assert counts.lost == [], (
        f"settled: {settled}, window: {faults.windows}\n{counts.stories(counts.lost)}"
    )
    assert counts.unexplained == [], counts.unexplained[:3]
    for worker in workers:
        assert worker.proc.poll() is None, f"worker {worker.name} exited:\n{worker.tail()}"
    # The crash reached the workers' consumers -- at least one; a worker whose
    # main process spends the two seconds in its pool's failed result writes
    # may never ask the broker for anything meanwhile (4 runs in 10 on a fast
    # machine), and carries on as if nothing had happened.
    assert any("Connection to broker lost" in worker.log() for worker in workers)
