"""Which PostgreSQL errors mean "wait and reconnect" (issue 10, item 4).

The server states below come through the drivers as different exception classes
(read-only is an ``InternalError``, a connection limit an ``OperationalError``),
so the dialect reads the SQLSTATE: ``pgcode`` on psycopg2, ``sqlstate`` on
psycopg 3.  The real errors are raised by a private server in
tests/faults/test_read_only.py; these pin the whole list without one.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from celery_eventstore.storage.dialects.postgresql import PostgreSQLDialect

UNAVAILABLE = {
    "25006": sa.exc.InternalError,  # read_only_sql_transaction
    "57P01": sa.exc.OperationalError,  # admin_shutdown
    "57P02": sa.exc.OperationalError,  # crash_shutdown
    "57P03": sa.exc.OperationalError,  # cannot_connect_now
    "53300": sa.exc.OperationalError,  # too_many_connections
    "08006": sa.exc.OperationalError,  # connection_failure
    "08P01": sa.exc.InternalError,  # protocol_violation (class 08)
}
REFUSED = {
    "22001": sa.exc.DataError,  # string_data_right_truncation
    "42P01": sa.exc.ProgrammingError,  # undefined_table
    "42501": sa.exc.ProgrammingError,  # insufficient_privilege
    "XX000": sa.exc.InternalError,  # internal_error
}


class Psycopg2Error(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(f"SQLSTATE {code}")
        self.pgcode = code


class PsycopgError(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(f"SQLSTATE {code}")
        self.sqlstate = code


def _error(kind: type[sa.exc.DBAPIError], orig: Exception) -> sa.exc.DBAPIError:
    return kind("SELECT 1", {}, orig)


@pytest.mark.parametrize("driver_error", [Psycopg2Error, PsycopgError])
@pytest.mark.parametrize("code", sorted(UNAVAILABLE))
def test_server_states_are_unavailable(driver_error, code):
    exc = _error(UNAVAILABLE[code], driver_error(code))
    dialect = PostgreSQLDialect()
    assert dialect.is_unavailable(exc)
    assert not dialect.is_conflict(exc)


@pytest.mark.parametrize("driver_error", [Psycopg2Error, PsycopgError])
@pytest.mark.parametrize("code", sorted(REFUSED))
def test_refusals_are_not_unavailable(driver_error, code):
    assert not PostgreSQLDialect().is_unavailable(_error(REFUSED[code], driver_error(code)))


def test_a_connection_error_without_a_sqlstate_is_unavailable():
    """psycopg2 gives no SQLSTATE for "could not connect": the class decides."""
    assert PostgreSQLDialect().is_unavailable(
        _error(sa.exc.OperationalError, Exception("could not connect"))
    )
