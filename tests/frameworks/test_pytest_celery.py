"""A user's own test suite on the embedded SQLite store, with the ``celery_app`` and
``celery_worker`` fixtures of Celery's pytest plugin (which pytest-celery enables).

docs/testing.rst includes this file: what it shows is what runs here.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

# pytest-celery 1.x also has a Docker-based ``celery_worker`` fixture that hides
# Celery's in-process one (celery/pytest-celery#442): take Celery's.
from celery.contrib.pytest import celery_worker  # noqa: F401

from celery_eventstore import atomic


# [config]
@pytest.fixture(scope="session")
def jobs_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("celery") / "jobs.db"


@pytest.fixture(scope="session")
def celery_config(jobs_db: Path) -> dict[str, Any]:
    url = f"eventstore+sqlite:///{jobs_db}"
    return {
        "broker_url": url,
        "result_backend": url,
        "broker_transport_options": {"polling_interval": 0.1},
    }
# [config]


# [task]
def test_a_task_runs_in_the_test_worker(
    celery_app: Any, celery_worker: Any  # noqa: F811 - the fixture imported above
) -> None:
    @celery_app.task
    def add(x: int, y: int) -> int:
        return x + y

    celery_worker.reload()  # the worker started before the task was defined
    assert add.delay(2, 3).get(timeout=10) == 5
# [task]


# [atomic]
def test_a_job_published_in_a_transaction_runs_once_it_commits(
    celery_app: Any, celery_worker: Any, jobs_db: Path  # noqa: F811
) -> None:
    @celery_app.task
    def greet(name: str) -> str:
        return f"hello {name}"

    celery_worker.reload()
    conn = sqlite3.connect(jobs_db, timeout=30)  # the application's own connection
    conn.execute("CREATE TABLE IF NOT EXISTS people (name TEXT)")
    conn.execute("INSERT INTO people VALUES ('ada')")
    with atomic(conn, app=celery_app):
        result = greet.delay("ada")
    conn.rollback()
    with atomic(conn, app=celery_app):
        conn.execute("INSERT INTO people VALUES ('grace')")
        committed = greet.delay("grace")
    conn.commit()
    assert committed.get(timeout=10) == "hello grace"
    assert result.state == "PENDING"  # rolled back: never published
# [atomic]
