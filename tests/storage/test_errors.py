"""Bad input fails with a clear error that never shows a password."""

from __future__ import annotations

import socket

import pytest

from celery_eventstore.exceptions import (
    DatabaseUnavailable,
    InvalidURL,
    SchemaMissing,
    UnsupportedDatabase,
)
from celery_eventstore.storage import EventStore, NewMessage

SECRET = "s3cr3t-pa55"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_malformed_url_is_refused_without_echoing_it():
    with pytest.raises(InvalidURL) as info:
        EventStore(f"not a url with {SECRET}")
    assert SECRET not in str(info.value)


def test_unsupported_database_is_named():
    with pytest.raises(UnsupportedDatabase, match="mysql"):
        EventStore(f"mysql://app:{SECRET}@127.0.0.1/app")


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_unreachable_postgresql_hides_the_password(driver):
    store = EventStore(f"postgresql+{driver}://app:{SECRET}@127.0.0.1:{_closed_port()}/app")
    with pytest.raises(DatabaseUnavailable) as info:
        store.ping()
    text = f"{info.value} {info.value.__cause__!r}"
    assert "127.0.0.1" in str(info.value)
    assert SECRET not in text
    assert SECRET not in repr(store)


def test_sqlite_in_a_missing_directory_is_unavailable(tmp_path):
    store = EventStore(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'x.db'}")
    with pytest.raises(DatabaseUnavailable):
        store.ping()


def test_missing_schema_says_how_to_create_it(tmp_path):
    store = EventStore(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(SchemaMissing, match=r"`celery-eventstore --url URL migrate`"):
        store.publish([NewMessage(stream="t", queue="q", message={})])
    assert store.schema_version() == 0
