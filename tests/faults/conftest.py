"""The fault suite reuses the acceptance harness (brokers, real workers, a producer).

``harness``, ``proj`` and ``resultproj`` live in tests/acceptance; put that directory
on the path so these tests also run on their own (``pytest tests/faults``).  Tests
that break PostgreSQL (restart it, make it read-only) run against a private server
of their own (:func:`pg_server`), never the machine's.
Tests must not ``from conftest import ...`` (see tests/acceptance/conftest.py).
"""

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ACCEPTANCE = str(Path(__file__).resolve().parent.parent / "acceptance")
if ACCEPTANCE not in sys.path:
    sys.path.insert(0, ACCEPTANCE)

from harness import (  # noqa: E402, F401 - fixtures and hooks pytest finds here
    Broker,
    open_broker,
    pytest_runtest_makereport,
    result_app,
    start_worker,
)


@pytest.fixture
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    """A broker on a SQLite file or on a private PostgreSQL server (:func:`pg_server`),
    chosen by indirect parametrization (``"sqlite"`` or ``"postgresql"``, the default).
    Its workers stop before the database goes."""
    dialect: Any = getattr(request, "param", "postgresql")
    if dialect == "sqlite":
        url = f"sqlite:///{tmp_path / 'broker.db'}"
    else:
        url = request.getfixturevalue("pg_server").url
    yield from open_broker(request, tmp_path, None, url)
