"""Real worker data for the CLI tests, made once per dialect, and ways to run the CLI.

:func:`make_data` runs a ``celery -A cliproj worker`` on a fresh store and leaves in
it a plain task, a retry chain, a chord, an ETA task, dead letters, a task revoked by
the CLI while scheduled (the worker restarted after the revoke), a task scheduled for
later and one waiting in a queue no worker reads.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cliproj
import proj
import pytest
import sqlalchemy as sa
from celery import chord, group
from click.testing import CliRunner, Result
from harness import HERE as ACCEPTANCE
from harness import Broker, Worker, make_broker, wait_for

from celery_eventstore import lifecycle as lc
from celery_eventstore.cli import eventstore

CLI_DIR = Path(__file__).resolve().parent
TIMEOUT = 30.0
#: Countdown of the task revoked while scheduled: due while the restarted worker runs.
#: The revoke (a ``celery`` subprocess) must end before it: that start-up alone took
#: over 6 s on a loaded machine, and the first worker then ran the task.  Each
#: dialect's data waits for it to pass (twice 15 s of the suite's budget).
REVOKED_COUNTDOWN = 15.0
#: Poison messages: one for ``dead retry ID``, one for ``dead purge``, one for ``--all``.
POISONS = ("retry_one", "purge", "retry_all")


@dataclass
class Data:
    broker: Broker
    app: Any
    ids: dict[str, str] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)
    #: The ``eventstore revoke`` run of the fixture (made between the two workers).
    revoke_run: subprocess.CompletedProcess[str] | None = None

    @property
    def store(self) -> Any:
        return self.broker.store

    @property
    def worker(self) -> Worker:
        return self.workers[-1]

    def types(self, stream: str) -> list[str]:
        return self.broker.types(stream)

    def env(self) -> dict[str, str]:
        """The environment ``celery -A cliproj`` (worker or sub-command) reads."""
        env = dict(os.environ)
        env.update(
            {
                proj.BROKER_ENV: self.broker.url,
                proj.OPTIONS_ENV: json.dumps(self.broker.transport_options()),
                proj.MARKERS_ENV: str(self.broker.markers),
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(CLI_DIR), str(ACCEPTANCE), env.get("PYTHONPATH", "")) if p
                ),
            }
        )
        return env

    def celery(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``celery -A cliproj eventstore ARGS`` as a subprocess: the app gives the store."""
        done = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "cliproj", "eventstore", *args],
            cwd=CLI_DIR, env=self.env(), capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
        if check:
            assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done

    def url_args(self) -> list[str]:
        """The stand-alone global options naming this store."""
        args = ["--url", self.broker.url]
        return args + (["--schema", self.broker.schema] if self.broker.schema else [])

    def cli(self, *args: str, code: int = 0) -> Result:
        """The stand-alone command in-process (click's CliRunner): quicker than a process."""
        result = CliRunner().invoke(eventstore, [*self.url_args(), *args], catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result


@contextmanager
def _pythonpath(extra: Path) -> Iterator[None]:
    """Workers inherit the environment: let them import ``cliproj`` too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(extra), os.environ.get(
            "PYTHONPATH", "")) if p))
        yield


def _start(broker: Broker) -> Worker:
    queues = ["-Q", f"celery,{cliproj.POISON_QUEUE}"]
    worker = Worker(broker, f"cli-{uuid.uuid4().hex[:6]}", queues, app="cliproj")
    broker.workers.append(worker)
    worker.wait_ready()
    return worker


def _finished(data: Data, stream: str) -> bool:
    return data.store.load(stream).result_state in (
        lc.ResultState.SUCCESS, lc.ResultState.FAILURE
    )


def produce(data: Data) -> None:
    app, ids, broker = data.app, data.ids, data.broker
    tasks = {name.split(".")[-1]: app.tasks[name] for name in app.tasks if "cliproj" in name}
    with _pythonpath(CLI_DIR):
        data.workers.append(_start(broker))
        ids["plain"] = tasks["add"].delay(2, 3).id
        ids["flaky"] = tasks["flaky"].delay(2).id
        result = chord([tasks["add"].s(i, i) for i in range(3)], tasks["tsum"].s()).apply_async()
        ids["chord"], ids["group"] = result.id, result.parent.id
        ids["header"] = result.parent.results[0].id
        ids["eta"] = tasks["add"].apply_async((1, 1), countdown=1).id
        # A plain group, never saved: no stream of its own, its members know it.
        plain_group = group(tasks["add"].s(7, 7), tasks["add"].s(8, 8)).apply_async()
        ids["plain_group"] = plain_group.id
        ids["plain_group_members"] = ",".join(r.id for r in plain_group.results)
        ids["failed"] = tasks["fail"].apply_async(
            ("no such customer",), kwargs={}, expires=3600
        ).id
        ids["revoked"] = tasks["add"].apply_async((9, 9), countdown=REVOKED_COUNTDOWN).id
        ids["scheduled"] = tasks["add"].apply_async((0, 0), countdown=3600).id
        ids["idle"] = tasks["add"].apply_async((5, 5), queue=cliproj.IDLE_QUEUE).id
        for name in POISONS:
            queue = cliproj.POISON_QUEUE if name == "purge" else "celery"
            ids[f"poison_{name}"] = tasks["poison"].apply_async(queue=queue).id

        # The durable revoke, while the worker holds nothing of the task in memory.
        data.revoke_run = data.celery("revoke", ids["revoked"])
        due = data.store.read_stream(ids["revoked"])[0].event.not_before
        late = data.store.now() - due
        assert late < 0, (
            f"the revoke ended {late:.1f} s after its task fell due (REVOKED_COUNTDOWN is "
            f"too short for this machine): {data.revoke_run.stdout}"
        )
        done = ["plain", "flaky", "chord", "eta", "failed"]
        wait_for(
            lambda: all(_finished(data, ids[k]) for k in done),
            TIMEOUT, "the worker to finish the tasks",
            show=lambda: {k: data.types(ids[k]) for k in done},
        )  # fmt: skip
        poisons = [ids[f"poison_{n}"] for n in POISONS]
        wait_for(
            lambda: all("DeadLettered" in data.types(p) for p in poisons),
            TIMEOUT, "the poison messages to be dead-lettered",
            show=lambda: [data.types(p) for p in poisons],
        )  # fmt: skip

        # Restart the worker: Celery's own revoke would be forgotten now.
        data.workers[0].stop()
        data.workers.append(_start(broker))
        # Let the restarted worker poll a few times past the revoked task's ETA.
        time.sleep(max(0.0, due + 1.0 - data.store.now()))


@contextmanager
def make_data(
    dialect: str, tmp_path: Path, postgresql_url: str | None, reaper: Any
) -> Iterator[Data]:
    if dialect == "sqlite":
        url = f"sqlite:///{tmp_path / 'broker.db'}"
    else:
        assert postgresql_url is not None
        url = postgresql_url
    broker, cleanup = make_broker(url, tmp_path, prefix="cli")
    # Dead letters come from Reject; a short lease is not needed.
    app = cliproj.make_app(broker.url, broker.transport_options())
    data = Data(broker, app)

    try:
        produce(data)
        yield data
    except BaseException:
        for w in broker.workers:
            print(f"\n----- log of worker {w.name} -----\n{w.tail()}")
        raise
    finally:
        app.pool.force_close_all()
        app.close()
        for w in broker.workers:
            w.terminate()
        reaper.submit(cleanup)


@contextmanager
def empty_database(data: Data, tmp_path: Path) -> Iterator[list[str]]:
    """Stand-alone global options naming an empty database of ``data``'s dialect."""
    if data.broker.dialect == "sqlite":
        yield ["--url", f"sqlite:///{tmp_path / 'empty.db'}"]
        return
    schema = f"clie_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(data.broker.db_url)
    with engine.begin() as conn:
        conn.execute(sa.schema.CreateSchema(schema))
    try:
        yield ["--url", data.broker.db_url, "--schema", schema]
    finally:
        with engine.begin() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=True))
        engine.dispose()


#: One line of a timeline: time, event, attempt (``#2``) if any, the rest.
TIMELINE_LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3})  (\w+)(?: +#(\d+))? *(.*)$")


def timeline(text: str) -> dict[str, list[tuple[str, int | None, str]]]:
    """``history`` output as ``{stream: [(event, attempt, details), ...]}``."""
    out: dict[str, list[tuple[str, int | None, str]]] = {}
    current: list[tuple[str, int | None, str]] = []
    for line in text.splitlines():
        if line.startswith("== "):
            current = out.setdefault(line.split()[1], [])
            continue
        match = TIMELINE_LINE.match(line)
        assert match, f"not a timeline line: {line!r}"
        _, event, attempt, rest = match.groups()
        current.append((event, int(attempt) if attempt else None, rest))
    return out
