"""The acceptance fixtures live in harness.py, importable by name from the tests.

Tests must not ``from conftest import ...``: with several test directories in one run,
``conftest`` names whichever directory's conftest was imported first.
"""

from harness import (  # noqa: F401 - fixtures and hooks pytest finds here
    broker,
    current_result_app,
    pytest_runtest_makereport,
    result_app,
    start_worker,
    worker,
)
