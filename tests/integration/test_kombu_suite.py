"""kombu's own integration suite, run on the eventstore transport (SQLite, PostgreSQL).

The mixins come from the sdist of the installed kombu (kombu_suite.py); each test
gets a fresh SQLite file; each test class a fresh PostgreSQL schema, dropped afterwards.
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import kombu
import kombu_suite
import pytest
import sqlalchemy as sa

import celery_eventstore  # noqa: F401 - registers the eventstore+ URL alias

try:
    common = kombu_suite.load_common()
except kombu_suite.SuiteUnavailable as exc:
    common = kombu_suite.unavailable_suite(str(exc))


@pytest.fixture(autouse=True)
def _consumer_log(caplog: pytest.LogCaptureFixture) -> None:
    """A failing test shows the consumer's wake-ups and claims, with their times
    (kombu's event-loop tests have a one-second deadline)."""
    caplog.set_level(logging.DEBUG, logger="celery_eventstore")


def _open(url: str, options: dict[str, Any]) -> Iterator[kombu.Connection]:
    """A connection for one test; afterwards it is closed and its store's pool too."""
    connection = kombu.Connection(url, transport_options=options)
    # The transport's store is shared by every connection to this database in the
    # process; it is made here, so it can be closed once the test is done with it.
    store = connection.transport.store
    try:
        yield connection
    finally:
        connection.release()
        store.close()


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SQLite:
    @pytest.fixture
    def connection(self, tmp_path: Any) -> Iterator[kombu.Connection]:
        yield from _open(f"eventstore+sqlite:///{tmp_path / 'broker.db'}", {})

    @pytest.fixture
    def invalid_connection(self, tmp_path: Any) -> Iterator[kombu.Connection]:
        # SQLite creates a missing file, not a missing directory: opening fails.
        yield from _open(f"eventstore+sqlite:///{tmp_path / 'missing' / 'broker.db'}", {})


@pytest.fixture(scope="module")
def postgresql_engine(postgresql_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(postgresql_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="class")
def postgresql_schema(postgresql_engine: sa.Engine) -> Iterator[str]:
    """A fresh schema per test class, dropped afterwards.

    Per class, not per test: creating the tables takes a third of a second on
    PostgreSQL.  Within a mixin every test uses queues and exchanges of its own.
    """
    schema = f"kombu_{uuid.uuid4().hex[:12]}"
    with postgresql_engine.begin() as conn:
        conn.execute(sa.schema.CreateSchema(schema))
    try:
        yield schema
    finally:
        with postgresql_engine.begin() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=True))


class PostgreSQL:
    @pytest.fixture
    def connection(
        self, postgresql_url: str, postgresql_schema: str
    ) -> Iterator[kombu.Connection]:
        yield from _open(f"eventstore+{postgresql_url}", {"schema": postgresql_schema})

    @pytest.fixture
    def invalid_connection(self, postgresql_url: str) -> Iterator[kombu.Connection]:
        # The same server and database, on a port nothing listens on.
        url = sa.make_url(postgresql_url).set(host="127.0.0.1", port=_closed_port())
        yield from _open(f"eventstore+{url.render_as_string(hide_password=False)}", {})


class ConnectionErrors:
    """As kombu's Redis suite checks for its transport: a database that cannot be
    reached raises one of the transport's ``connection_errors``, which kombu and
    Celery retry, rather than an error that would end a worker."""

    def test_failed_connect_is_a_connection_error(
        self, invalid_connection: kombu.Connection
    ) -> None:
        transport = invalid_connection.transport
        with pytest.raises(transport.connection_errors):
            transport.establish_connection()


#: BasePriority's name for the order our transport serves by default: Redis's, where
#: priority 0 is served first ("asc" would be AMQP's, 9 first).
DEFAULT_PRIORITY_ORDER = "desc"


# -- SQLite ----------------------------------------------------------------------


class TestSQLiteBasicFunctionality(SQLite, ConnectionErrors, common.BasicFunctionality):
    pass


class TestSQLiteExchangeTypes(SQLite, common.BaseExchangeTypes):
    pass


class TestSQLiteTimeToLive(SQLite, common.BaseTimeToLive):
    pass


class TestSQLitePriority(SQLite, common.BasePriority):
    PRIORITY_ORDER = DEFAULT_PRIORITY_ORDER


class TestSQLiteMessage(SQLite, common.BaseMessage):
    pass


class TestSQLiteEventLoop(SQLite, common.BaseEventLoop):
    pass


# -- PostgreSQL ------------------------------------------------------------------


class TestPostgreSQLBasicFunctionality(PostgreSQL, ConnectionErrors, common.BasicFunctionality):
    pass


class TestPostgreSQLExchangeTypes(PostgreSQL, common.BaseExchangeTypes):
    pass


class TestPostgreSQLTimeToLive(PostgreSQL, common.BaseTimeToLive):
    pass


class TestPostgreSQLPriority(PostgreSQL, common.BasePriority):
    PRIORITY_ORDER = DEFAULT_PRIORITY_ORDER


class TestPostgreSQLMessage(PostgreSQL, common.BaseMessage):
    pass


class TestPostgreSQLEventLoop(PostgreSQL, common.BaseEventLoop):
    pass
