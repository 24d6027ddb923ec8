"""Fixtures for the consumer bookkeeping tests: a real store on a SQLite file and
on a fresh PostgreSQL schema, and a :class:`consumerrig.Rig` on it."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from consumerrig import QUIET, Rig

Database = tuple[str, dict[str, Any]]


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Database:
    return f"sqlite:///{tmp_path / 'events.db'}", {}


@pytest.fixture
def postgresql_db(postgresql_url: str) -> Iterator[Database]:
    """A fresh PostgreSQL schema per test, dropped afterwards (only that one)."""
    schema = f"consumer_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(postgresql_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.schema.CreateSchema(schema))
    try:
        yield postgresql_url, {"schema": schema}
    finally:
        with engine.begin() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=True))
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest) -> Database:
    database: Database = request.getfixturevalue(f"{request.param}_db")
    return database


@pytest.fixture
def make_rig(db: Database) -> Iterator[Callable[..., Rig]]:
    """``make_rig(prefetch, **transport_options)``: a rig on the test's database."""
    rigs: list[Rig] = []

    def make(prefetch: int, url: str | None = None, **options: Any) -> Rig:
        rig = Rig(url or db[0], {**db[1], **QUIET, **options}, prefetch)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()
