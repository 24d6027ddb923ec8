"""Prefetch and clean shutdown under the worker's event loop, where claims run on a
background thread: never more claimed than the prefetch window, and a warm
shutdown gives back every claim it did not finish -- on both dialects."""

from __future__ import annotations

import time
from typing import Any

from harness import Broker, wait_for

TASKS = 8
PREFETCH = 2  # -c 1 with a prefetch multiplier of 2


def test_claims_stay_within_prefetch_and_shutdown_gives_the_rest_back(
    broker: Broker, start_worker: Any
) -> None:
    worker = start_worker("-c", "1", "--prefetch-multiplier", str(PREFETCH))
    hold = broker.app.tasks["proj.hold"]
    ids = [hold.apply_async(args=(1.5,)).id for _ in range(TASKS)]
    broker.wait_for_runs(ids[0], ["started"])

    # While the first task holds the only pool process, the worker keeps asking
    # for more; the claims in flight must never go past the prefetch window.
    peak = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        peak = max(peak, broker.stats().claimed)
        time.sleep(0.05)
    assert 1 <= peak <= PREFETCH

    worker.terminate()  # warm: finish the running task, give back the prefetched
    worker.proc.wait(30)

    finished = [i for i in ids if "Acked" in broker.types(i)]
    stats = broker.stats()
    assert stats.claimed == 0, broker.store.queue_stats()
    assert finished and stats.ready == TASKS - len(finished)
    for task_id in set(ids) - set(finished):
        types = broker.types(task_id)
        # Given back (or never taken): claimable again, nothing lost.
        assert types[-1] in ("Published", "Requeued"), (task_id, types)

    # A new worker finishes the rest, each exactly once.
    start_worker()
    for task_id in ids:
        wait_for(lambda t=task_id: "Acked" in broker.types(t), 30, f"{task_id} acked")
        assert broker.types(task_id).count("Acked") == 1


def test_no_wake_up_is_lost_while_a_claim_is_in_flight(
    broker: Broker, start_worker: Any
) -> None:
    # The safety-net poll is far away: every task below must be claimed because
    # of its own wake-up, even when it arrives while another claim is running.
    broker.options["polling_interval"] = 30
    start_worker("-c", "2")
    plain = broker.app.tasks["proj.plain"]
    for _ in range(3):
        burst = []
        for _ in range(10):
            burst.append(plain.delay().id)
            time.sleep(0.003)
        for task_id in burst:
            broker.wait_for_runs(task_id, ["ran"], timeout=10)
