"""``prune`` and ``rebuild`` draw a progress bar on a terminal and nothing when piped.

The command runs as a real process both ways.  For the terminal its stdout is the
slave side of a pseudo-terminal (``pty``), so the decision is the one the command
makes for a person -- ``isatty()`` on its real stdout -- not a patched answer.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import pytest
from harness import Broker

from celery_eventstore.storage import NewMessage

FINISHED = 6


@pytest.fixture
def store_args(broker: Broker) -> list[str]:
    """A store with finished streams (published, claimed, acked) and a waiting one."""
    store = broker.store
    store.publish([NewMessage(f"done-{i}", "celery", {"n": i}) for i in range(FINISHED)])
    claimed = store.claim(["celery"], FINISHED, "test", 30)
    store.ack([m.ref for m in claimed])
    store.publish([NewMessage("waiting", "celery", {"n": -1})])
    args = [sys.executable, "-m", "celery_eventstore.cli", "--url", broker.db_url]
    return args + (["--schema", broker.schema] if broker.schema else [])


def _piped(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.stderr == ""
    return done.stdout


def _on_a_terminal(command: list[str]) -> str:
    """Run ``command`` with a pseudo-terminal as its stdout; what it wrote there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=subprocess.PIPE)  # fmt: skip
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the process closed its end of the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
        proc.wait(60)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    return b"".join(chunks).decode().replace("\r\n", "\n")


def _events(broker: Broker) -> int:
    return len(broker.store.read_all(limit=10_000))


def test_rebuild_is_quiet_when_piped(broker: Broker, store_args: list[str]) -> None:
    assert _piped([*store_args, "rebuild"]) == f"replayed {_events(broker)} events\n"


def test_rebuild_draws_a_bar_on_a_terminal(broker: Broker, store_args: list[str]) -> None:
    out = _on_a_terminal([*store_args, "rebuild"])
    assert "replaying" in out and "[#" in out and "100%" in out, repr(out)
    assert out.endswith(f"replayed {_events(broker)} events\n"), repr(out)


def test_prune_is_quiet_when_piped(store_args: list[str]) -> None:
    out = _piped([*store_args, "prune", "--older-than", "0", "--batch", "2"])
    assert out == f"pruned {FINISHED} streams\n"


def test_prune_draws_a_bar_on_a_terminal(broker: Broker, store_args: list[str]) -> None:
    out = _on_a_terminal([*store_args, "prune", "--older-than", "0", "--batch", "2"])
    assert "pruning" in out and "[#" in out and "100%" in out, repr(out)
    assert out.endswith(f"pruned {FINISHED} streams\n"), repr(out)
    assert [r.stream for r in broker.store.read_all()] == ["waiting"]
