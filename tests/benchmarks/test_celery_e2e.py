"""The Celery end-to-end benchmark still runs: a handful of tasks on SQLite, and a
peer that cannot be reached is reported rather than fatal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "celery_e2e.py"
FIGURES = ("1. publish", "2. publish from 8", "3. 1000 publishes", "4. drain", "5. CPU",
           "6. latency", "7. SQLite", "targets (issue 15)")


def run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--json", str(tmp_path / "out.json"), *args],
        capture_output=True, text=True, timeout=240, env={**os.environ, **env},
    )


@pytest.mark.slow
def test_every_figure_is_measured_on_sqlite(tmp_path: Path) -> None:
    done = run(tmp_path, "--only", "eventstore+sqlite")
    assert done.returncode == 0, done.stderr[-2000:]
    for heading in FIGURES:
        assert heading in done.stdout
    row = json.loads((tmp_path / "out.json").read_text())["runs"][0]["eventstore+sqlite"]
    for key in ("publish/s", "delay p50 ms", "raw commit p50 ms", "producers/s", "atomic/s",
                "atomic floor/s",
                "drain ignored/s", "drain results/s", "cpu results worker us",
                "start p50 ms", "result p50 ms", "get()/s"):
        assert row[key] > 0, key


@pytest.mark.slow
def test_an_unreachable_peer_is_reported(tmp_path: Path) -> None:
    done = run(tmp_path, "--only", "rabbitmq", E2E_AMQP_URL="amqp://guest:guest@127.0.0.1:9//")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rabbitmq: unreachable" in done.stdout
    assert "unreachable" in json.loads((tmp_path / "out.json").read_text())["runs"][0]["rabbitmq"]
