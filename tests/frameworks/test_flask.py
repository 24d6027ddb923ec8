"""Atomic enqueue through Flask-SQLAlchemy's scoped session, with real workers, on
SQLite and PostgreSQL: ``atomic_requests(app, db.session)`` and no change to the views'
publishing code."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Broker, queue_drained, wait_for

HERE = Path(__file__).resolve().parent


@pytest.fixture
def flaskshop(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The ``flaskshop`` module configured for ``broker``, its table created."""
    env = {
        "ACCEPTANCE_BROKER_URL": broker.url,
        "ACCEPTANCE_TRANSPORT_OPTIONS": json.dumps(broker.transport_options()),
        "ACCEPTANCE_MARKER_DIR": str(broker.markers),
        "FLASKSHOP_SCHEMA": broker.schema or "",
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    for name, value in env.items():  # the harness's workers inherit them too
        monkeypatch.setenv(name, value)
    sys.modules.pop("flaskshop", None)  # its Celery app reads the environment
    import flaskshop

    app = flaskshop.create_app()
    with app.app_context():
        flaskshop.db.create_all()
    yield flaskshop
    flaskshop.celery.pool.force_close_all()
    with app.app_context():
        flaskshop.db.engine.dispose()


def _runs(broker: Broker, order: str) -> list[dict[str, Any]]:
    return broker.runs(f"ran-{order}")


@pytest.mark.slow
def test_requests_publish_in_db_sessions_transaction(
    broker: Broker, flaskshop: Any, start_worker: Any
) -> None:
    start_worker(app="flaskshop")
    client = flaskshop.create_app().test_client()
    assert client.post("/orders/commit").status_code == 200
    assert client.post("/orders/failed?fail=1").status_code == 500
    wait_for(lambda: _runs(broker, "commit"), 30, "the committed order's job to run")
    stats = broker.stats
    # Read once per check: the row can go between two reads.
    wait_for(lambda: queue_drained(stats()), 10, "an empty queue")
    assert _runs(broker, "commit") == [{"order": "commit", "exists": True}]
    assert broker.events("job-failed") == []
    assert _runs(broker, "failed") == []


class RaceClient:
    def __init__(self, broker: Broker, n: int, seed: int, iterations: int) -> None:
        self.prefix = f"c{n}"
        self.log_path = broker.tmp_path / f"flask-{self.prefix}.log"
        self.err_path = broker.tmp_path / f"flask-{self.prefix}.err"
        config = {"prefix": self.prefix, "iterations": iterations, "seed": seed,
                  "log": str(self.log_path)}
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flaskshop", json.dumps(config)], cwd=HERE,
                stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
            )
        self.killed = False

    def lines(self) -> list[str]:
        return self.log_path.read_text().splitlines() if self.log_path.exists() else []

    def working(self) -> bool:
        lines = self.lines()
        return self.proc.poll() is None and "ready" in lines and "done" not in lines

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.killed = True


@pytest.mark.slow
def test_enqueue_iff_commit_through_flask_with_clients_killed_at_random(
    broker: Broker, flaskshop: Any
) -> None:
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    clients = [RaceClient(broker, n, seed + n, 30) for n in range(4)]
    try:
        kills = 0
        deadline = time.monotonic() + 90
        while kills < 3 and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.05, 0.4))
            working = [c for c in clients if c.working()]
            if not working:
                if all(c.proc.poll() is not None for c in clients):
                    break
                continue
            rng.choice(working).kill()
            kills += 1
            clients.append(RaceClient(broker, len(clients), seed + len(clients), 15))
        wait_for(lambda: all(c.proc.poll() is not None for c in clients), 120,
                 "the client processes to finish", interval=0.2)
    finally:
        for c in clients:
            if c.proc.poll() is None:
                c.kill()

    failed = {c.prefix: c.err_path.read_text() for c in clients
              if not c.killed and c.proc.returncode}
    assert not failed, f"client processes failed (seed {seed}): {failed}"
    assert kills >= 1, "no client was killed during its run"

    def logged(what: str) -> set[str]:
        return {line.split(" ", 1)[1] for c in clients for line in c.lines()
                if line.startswith(what + " ")}

    app = flaskshop.create_app()
    with app.app_context():
        orders = set(flaskshop.db.session.scalars(flaskshop.db.select(flaskshop.Order.id)))
    committed, rolled_back = logged("committed"), logged("rolledback")
    assert committed and rolled_back, seed
    assert committed <= orders and not (rolled_back & orders), seed
    published = Counter(
        r.stream for r in broker.store.read_all(limit=100_000)
        if r.type == "Published" and r.stream.startswith("job-")
    )
    assert set(published) == {f"job-{o}" for o in orders}, seed
    assert set(published.values()) == {1}, seed
