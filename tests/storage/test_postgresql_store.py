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


class TestCommitDurability:
    """Claims and acks commit with synchronous_commit off, set once per session;
    publishes and results on the same pooled connection still wait for the disk."""

    @pytest.fixture
    def store(self, driver_db):
        factory = make_factory(driver_db)
        make = next(factory)
        # One pooled connection, so every transaction below shares the session.
        yield make(engine_options={"pool_size": 1, "max_overflow": 0})
        next(factory, None)

    @staticmethod
    def setting(conn: sa.Connection) -> str:
        return conn.exec_driver_sql("SHOW synchronous_commit").scalar_one()

    def test_relaxed_work_then_durable_work_on_one_session(self, store):
        from celery_eventstore.storage.records import NewMessage

        store.publish([NewMessage(stream="s1", queue="q", message={"body": "1"})])
        with store._write(durable=False) as conn:
            assert self.setting(conn) == "off"
        with store._write(durable=False) as conn:
            assert self.setting(conn) == "off"
        with store.transaction() as conn:
            assert self.setting(conn) == "on"
        # The claim is relaxed, the next publish is not.
        assert store.claim(["q"], 1, "c", 30)
        with store.transaction() as conn:
            assert self.setting(conn) == "on"

    def test_rolled_back_setting_is_set_again(self, store):
        with pytest.raises(RuntimeError), store._write(durable=False) as conn:
            assert self.setting(conn) == "off"
            raise RuntimeError("roll back the SET with the transaction")
        with store._write(durable=False) as conn:
            assert self.setting(conn) == "off"

    def test_async_commit_off_leaves_the_server_setting_alone(self, driver_db):
        factory = make_factory(driver_db)
        store = next(factory)(async_commit=False)
        with store.engine.connect() as conn:
            server_default = self.setting(conn)  # off on the tests' throwaway server
        with store._write(durable=False) as conn:
            assert self.setting(conn) == server_default
        with store.transaction() as conn:
            assert self.setting(conn) == server_default
        next(factory, None)
