"""The store contract on PostgreSQL, with both drivers."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from contract import StoreContract
from storehelpers import make_factory


@pytest.fixture(params=["psycopg2", "psycopg"])
def driver_db(request, postgresql_db):
    url, options = postgresql_db
    return sa.make_url(url).set(drivername=f"postgresql+{request.param}"), options


class TestPostgreSQLStore(StoreContract):
    @pytest.fixture
    def make_store(self, driver_db):
        yield from make_factory(driver_db)
