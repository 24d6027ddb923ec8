"""Fixtures for the consumer bookkeeping tests: a real store on a SQLite file and
on a fresh PostgreSQL schema, and a :class:`consumerrig.Rig` on it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from consumerrig import QUIET, Rig

Database = tuple[str, dict[str, Any]]


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
