"""Which DB-API driver a URL resolves to (what ``celery-eventstore check`` prints)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from celery_eventstore.storage import EventStore


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://app@db/app",
         "psycopg2 {psycopg2} (postgresql:// names no driver: the store uses psycopg2, "
         "while sa.create_engine('postgresql://...') picks psycopg)"),
        ("postgresql+psycopg2://app@db/app", "psycopg2 {psycopg2}"),
        ("postgresql+psycopg://app@db/app", "psycopg {psycopg}"),
        ("sqlite:///jobs.db", "pysqlite {sqlite}"),
    ],
)
def test_the_driver_a_url_resolves_to(url: str, expected: str) -> None:
    import sqlite3

    import psycopg
    import psycopg2

    versions = {
        "psycopg2": psycopg2.__version__.split(" ")[0],
        "psycopg": psycopg.__version__,
        "sqlite": sqlite3.sqlite_version,
    }
    if sa.make_url("postgresql://").get_dialect().driver == "psycopg2":  # SQLAlchemy 2.0
        expected = expected.split(" (")[0]
    store = EventStore(url)  # no connection is made
    try:
        assert store.driver() == expected.format(**versions)
    finally:
        store.close()
