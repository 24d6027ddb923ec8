"""The store contract on SQLite."""

from __future__ import annotations

import pytest
from contract import StoreContract
from storehelpers import make_factory


class TestSQLiteStore(StoreContract):
    @pytest.fixture
    def make_store(self, sqlite_db):
        yield from make_factory(sqlite_db)
