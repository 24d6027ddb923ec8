"""What ``eta.py`` and ``scaling.py`` share: the peers (the event store on PostgreSQL
and SQLite, Redis, RabbitMQ, kombu's SQL transport), a prefork worker, and a
client process that runs a snippet with the ``e2e_tasks`` app and prints JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
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


def scratch_schema(
    prefix: str, server: str | None = None
) -> tuple[sa.URL, str, Callable[[], None]]:
    """A new schema on ``server`` (the test PostgreSQL unless given): its
    server's URL (psycopg2), its name, and the function that drops it."""
    url = sa.make_url(server or PG).set(drivername="postgresql+psycopg2")
    schema = f"{prefix}_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.schema.CreateSchema(schema))

    def drop() -> None:
        with engine.begin() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=True))
        engine.dispose()

    return url, schema, drop


def peers(workdir: Path) -> list[Peer]:
    pg_plain, schema, drop_schema = scratch_schema("bench")
    pg_url = pg_plain.render_as_string(hide_password=False)
    sqlite = f"sqlite:///{workdir / 'bench.db'}"
    _, kombu_sqla_schema, drop_sqla_schema = scratch_schema("bench_sqla")

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
