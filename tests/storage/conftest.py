"""Store fixtures: the same contract runs on a SQLite file and on a PostgreSQL schema."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from storehelpers import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


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
