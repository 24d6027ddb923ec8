"""Atomic enqueue from the frameworks Celery users run: a Django project (``shop``)
and a Flask-SQLAlchemy app, each with real ``celery worker`` processes.

The acceptance harness (brokers, workers) lives in tests/acceptance; put that
directory on the path so these tests also run on their own.  Tests must not
``from conftest import ...`` (see tests/acceptance/conftest.py).
"""

import sys
from pathlib import Path

ACCEPTANCE = str(Path(__file__).resolve().parent.parent / "acceptance")
if ACCEPTANCE not in sys.path:
    sys.path.insert(0, ACCEPTANCE)

from harness import (  # noqa: E402, F401 - fixtures and hooks pytest finds here
    broker,
    pytest_runtest_makereport,
    start_worker,
)
