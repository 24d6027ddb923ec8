"""Store fixtures (the databases themselves are in the suite's conftest)."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from storehelpers import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sqlite", "psycopg2", "psycopg"])
def db(request: pytest.FixtureRequest) -> tuple[Any, dict[str, Any]]:
    """A fresh database: a SQLite file, or a PostgreSQL schema through either driver."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_db")
    url, options = request.getfixturevalue("postgresql_db")
    return sa.make_url(url).set(drivername=f"postgresql+{request.param}"), options
