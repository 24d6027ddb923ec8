"""A host's clock steps; a running task's lease holds (issue 10, item 2).

On PostgreSQL the database's clock decides every lease, inside the claim and renew
transactions: a process whose own clock jumps can neither take a live lease (its
clock ahead) nor let its own lease run out by renewing into the past (its clock
behind).  On SQLite the host's clock is the only clock, shared by every process on
the host: a step moves every process at once, so it cannot make one steal from
another; leases just end up shorter or longer by the step (documented).

Two ways to step: in-process, by moving ``time.time`` while one store works (fast,
both drivers); and with real processes under libfaketime (Debian's ``faketime``),
which moves every clock call of a process, the driver's included.
"""

from __future__ import annotations

import contextlib
import glob
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

from celery_eventstore.storage import EventStore, NewMessage

LEASE = 10.0


@contextlib.contextmanager
def host_clock_step(monkeypatch: pytest.MonkeyPatch, seconds: float) -> Iterator[None]:
    """This process's wall clock, moved by ``seconds`` for the block."""
    real = time.time
    with monkeypatch.context() as patch:
        patch.setattr(time, "time", lambda: real() + seconds)
        yield


def _stores(db: tuple[str, dict[str, Any]]) -> tuple[EventStore, EventStore]:
    url, options = db
    holder, thief = EventStore(url, **options), EventStore(url, **options)
    holder.migrate()
    # Both have measured their offset to the database clock before the step.
    holder.now(), thief.now()
    return holder, thief


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_a_clock_ahead_cannot_take_a_live_lease(postgresql_db, monkeypatch, driver):
    url, options = postgresql_db
    holder, thief = _stores((url.replace("psycopg2", driver), options))
    holder.publish([NewMessage(stream="t", queue="q", message={"body": "run me"})])
    [held] = holder.claim(["q"], 1, "holder", LEASE)

    with host_clock_step(monkeypatch, +20):
        assert thief.claim(["q"], 1, "thief", LEASE) == []
    assert holder.ack([held.ref]) == {held.delivery: "done"}


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_a_clock_behind_renews_into_the_future(postgresql_db, monkeypatch, driver):
    url, options = postgresql_db
    holder, thief = _stores((url.replace("psycopg2", driver), options))
    holder.publish([NewMessage(stream="t", queue="q", message={"body": "run me"})])
    [held] = holder.claim(["q"], 1, "holder", LEASE)

    with host_clock_step(monkeypatch, -60):
        assert holder.renew([held.ref], LEASE) == {held.delivery: "done"}
    assert thief.claim(["q"], 1, "thief", LEASE) == []
    assert holder.ack([held.ref]) == {held.delivery: "done"}


def test_sqlite_steps_every_process_alike(sqlite_db, monkeypatch):
    """One host, one clock: a step shortens or lengthens leases by the step for
    everyone, and a holder that renews keeps its task."""
    holder, thief = _stores(sqlite_db)
    holder.publish([NewMessage(stream="t", queue="q", message={"body": "run me"})])
    [held] = holder.claim(["q"], 1, "holder", 3 * LEASE)
    with host_clock_step(monkeypatch, +LEASE):
        assert thief.claim(["q"], 1, "thief", LEASE) == []
        assert holder.renew([held.ref], 3 * LEASE) == {held.delivery: "done"}
    with host_clock_step(monkeypatch, -6 * LEASE):
        assert thief.claim(["q"], 1, "thief", LEASE) == []
        assert holder.ack([held.ref]) == {held.delivery: "done"}


# -- real processes under libfaketime -----------------------------------------------

#: Where Debian's faketime package puts the library, whatever the architecture.
LIBFAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))), None)

#: Claims (thief), or renews and finally acks (holder), for ``seconds``; prints
#: what it got.  Its clock is what the step file says, read at every call.
PROCESS = textwrap.dedent("""
    import json, sys, time
    from celery_eventstore.storage import EventStore
    url, schema, role, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    store = EventStore(url, schema=schema)
    store.now()  # measures its offset to the database clock before any step
    report = {"claimed": 0, "renewals": [], "ack": None}
    # Counted rounds, not a deadline: the step moves every clock of the process.
    if role == "holder":
        [held] = store.claim(["q"], 1, "holder", 3.0)
        print("claimed", flush=True)
        for _ in range(int(seconds / 0.5)):
            time.sleep(0.5)
            report["renewals"].extend(store.renew([held.ref], 3.0).values())
        report["ack"] = store.ack([held.ref])[held.delivery]
    else:
        print("ready", flush=True)
        for _ in range(int(seconds / 0.2)):
            report["claimed"] += len(store.claim(["q"], 1, "thief", 3.0))
            time.sleep(0.2)
    print(json.dumps(report), flush=True)
""")


class Process:
    """A store process whose wall clock the test steps while it runs."""

    def __init__(self, tmp_path: Any, db: tuple[str, dict[str, Any]], role: str,
                 seconds: float) -> None:
        assert LIBFAKETIME
        self.step_file = tmp_path / f"{role}.step"
        self.step("+0s")
        url, options = db
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PROCESS, url, options["schema"], role, str(seconds)],
            stdout=subprocess.PIPE, text=True,
            env={
                **os.environ,
                "LD_PRELOAD": LIBFAKETIME,
                "FAKETIME_TIMESTAMP_FILE": str(self.step_file),
                "FAKETIME_NO_CACHE": "1",
            },
        )
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # claimed, or ready

    def step(self, offset: str) -> None:
        self.step_file.write_text(offset + "\n")

    def report(self) -> dict[str, Any]:
        import json

        out, _ = self.proc.communicate(timeout=60)
        return dict(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.slow
@pytest.mark.skipif(
    LIBFAKETIME is None and not os.environ.get("CI"),
    reason="needs Debian's faketime package (CI installs it)",
)
@pytest.mark.parametrize(("holder_step", "thief_step"), [("+0s", "+20s"), ("-60s", "+0s")])
def test_real_processes_under_faketime(postgresql_db, tmp_path, holder_step, thief_step):
    url, options = postgresql_db
    store = EventStore(url, **options)
    store.migrate()
    store.publish([NewMessage(stream="t", queue="q", message={"body": "run me"})])
    holder = Process(tmp_path, postgresql_db, "holder", 6.0)
    thief = Process(tmp_path, postgresql_db, "thief", 4.0)
    holder.step(holder_step)
    thief.step(thief_step)
    assert thief.report()["claimed"] == 0
    held = holder.report()
    assert set(held["renewals"]) == {"done"}
    assert held["ack"] == "done"
