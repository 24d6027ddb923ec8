"""The frozen migrations: every released version upgrades to the latest with its
data intact, migrating equals creating the live tables, and ``migrate --sql``
prints exactly what ``migrate`` runs."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from storehelpers import executed_statements, migrate_when_told

from celery_eventstore import lifecycle as lc
from celery_eventstore.cli import eventstore as cli
from celery_eventstore.storage import SCHEMA_VERSION, Binding, EventStore, NewMessage
from celery_eventstore.storage.dialects import dialect_for
from celery_eventstore.storage.migrations import VERSIONS, Migrator, Statements
from celery_eventstore.storage.schema import make_tables

#: Rows each version's tables could hold, as the code of that version wrote them.
#: Positions and ids are left to the database, as they were.
ROWS_CREATED_BY: dict[int, dict[str, list[dict[str, Any]]]] = {
    1: {
        "events": [
            {"stream_id": "task-ready", "version": 1, "type": "Published", "metadata": None,
             "recorded_at": 1000.0,
             "data": {"delivery": "d-ready", "queue": "celery", "message": {"body": "ready"},
                      "priority": 0, "not_before": None, "expires": None, "retry_of": None}},
            {"stream_id": "task-dead", "version": 1, "type": "Published", "metadata": None,
             "recorded_at": 1000.0,
             "data": {"delivery": "d-dead", "queue": "celery", "message": {"body": "dead"},
                      "priority": 3, "not_before": None, "expires": None, "retry_of": None}},
            {"stream_id": "task-dead", "version": 2, "type": "Claimed", "metadata": None,
             "recorded_at": 1000.0,
             "data": {"delivery": "d-dead", "claim": "c-1", "consumer": "w1",
                      "lease_until": 1030.0}},
            {"stream_id": "task-dead", "version": 3, "type": "DeadLettered", "metadata": None,
             "recorded_at": 1000.0, "data": {"delivery": "d-dead", "reason": "rejected"}},
        ],
        "messages": [
            {"delivery_id": "d-ready", "stream_id": "task-ready", "queue": "celery",
             "priority": 0, "seq": 1, "available_at": 0.0, "not_before": None, "expires": None,
             "claim_id": None, "consumer": None, "claimed_at": None, "lease_until": None},
        ],
        "dead_letters": [
            {"delivery_id": "d-dead", "stream_id": "task-dead", "queue": "celery",
             "reason": "rejected", "dead_at": 1000.0, "position": 4},
        ],
    },
    2: {
        "queues": [
            {"name": "celery", "transient": False, "expires": None, "message_ttl": None,
             "last_active": 1000.0},
        ],
        "bindings": [
            {"exchange": "celery", "queue": "celery", "routing_key": "celery", "pattern": None,
             "exchange_type": "direct"},
        ],
        "transient_messages": [
            {"queue": "reply.celery.pidbox", "priority": 0, "payload": {"body": "pong"},
             "expires_at": None},
        ],
    },
}



@pytest.fixture
def store(db: tuple[str, dict[str, Any]]) -> Iterator[EventStore]:
    url, options = db
    store = EventStore(url, **options)
    yield store
    store.close()


def migrator(
    store: EventStore, prefix: str | None = None, versions: Sequence[Statements] = VERSIONS
) -> Migrator:
    """A runner for the store's database (its own prefix unless told)."""
    return Migrator(
        dialect_for(store.url), prefix or store.table_prefix, store.schema, versions=versions
    )


def describe(conn: sa.Connection, prefix: str, schema: str | None) -> dict[str, Any]:
    """The tables of ``prefix`` as the database reports them, with the prefix taken
    out of every name (and sequence default), so two prefixes compare."""
    inspector = sa.inspect(conn)
    by_name = sorted(name for name in inspector.get_table_names(schema) if name.startswith(prefix))
    return _unprefixed(
        {
            name: {
                "columns": inspector.get_columns(name, schema),
                "primary_key": inspector.get_pk_constraint(name, schema),
                "unique": _by_name(inspector.get_unique_constraints(name, schema)),
                "indexes": _by_name(inspector.get_indexes(name, schema)),
                "foreign_keys": _by_name(inspector.get_foreign_keys(name, schema)),
                "checks": _by_name(inspector.get_check_constraints(name, schema)),
            }
            for name in by_name
        },
        prefix,
    )


def _by_name(items: list[Any]) -> list[Any]:
    return sorted(items, key=lambda item: str(item.get("name")))


def _unprefixed(value: Any, prefix: str) -> Any:
    if isinstance(value, dict):
        return {_unprefixed(k, prefix): _unprefixed(v, prefix) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_unprefixed(v, prefix) for v in value]
    if isinstance(value, str):
        return value.replace(prefix, "")
    if isinstance(value, sa.types.TypeEngine):
        return repr(value)  # reflected types compare by identity otherwise
    if isinstance(value, sa.sql.ClauseElement):  # a partial index's predicate, likewise
        return _unprefixed(str(value), prefix)
    return value


def fill(conn: sa.Connection, version: int, prefix: str, schema: str | None) -> dict[str, Any]:
    """Insert the rows versions 1..``version`` could hold; returns them by table."""
    rows = {
        name: table_rows
        for created_by, tables in ROWS_CREATED_BY.items()
        if created_by <= version
        for name, table_rows in tables.items()
    }
    for name, table_rows in rows.items():
        # The tables as the database has them, not the live ones: those may have
        # columns this old version never had.
        conn.execute(_reflect(conn, prefix + name, schema).insert(), table_rows)
    return rows


def read_back(
    conn: sa.Connection, expected: dict[str, Any], prefix: str, schema: str | None
) -> dict[str, Any]:
    """The rows of the tables in ``expected`` (in primary-key order), in its columns."""
    out = {}
    for name, rows in expected.items():
        table = _reflect(conn, prefix + name, schema)
        order = list(table.primary_key.columns)
        selected = conn.execute(sa.select(table).order_by(*order)).mappings()
        out[name] = [{key: row[key] for key in rows[0]} for row in selected]
    return out


def _reflect(conn: sa.Connection, name: str, schema: str | None) -> sa.Table:
    return sa.Table(name, sa.MetaData(schema=schema), autoload_with=conn)


def run_cli(store: EventStore, *args: str) -> str:
    target = ["--url", store.url.render_as_string(hide_password=False)]
    if store.schema:
        target += ["--schema", store.schema]
    result = CliRunner().invoke(cli, [*target, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


# -- the versions -----------------------------------------------------------------


def test_the_versions_are_numbered_modules_up_to_the_live_schema_version():
    assert len(VERSIONS) == SCHEMA_VERSION
    for number, statements in enumerate(VERSIONS, start=1):
        assert statements.__module__.rsplit(".", 1)[1].startswith(f"v{number:04d}_")


def test_migrating_from_nothing_creates_exactly_the_live_tables(store):
    """Fails the day someone changes schema.py without adding a version."""
    live = make_tables("live_", store.schema)
    with store.engine.begin() as conn:
        migrator(store, "migrated_").apply(conn)
        live.metadata.create_all(conn)
    with store.engine.connect() as conn:
        migrated = describe(conn, "migrated_", store.schema)
        assert migrated == describe(conn, "live_", store.schema)
    assert set(migrated) == {t.name.removeprefix("live_") for t in live.metadata.sorted_tables}


@pytest.mark.parametrize("old", range(SCHEMA_VERSION))
def test_every_earlier_version_upgrades_with_its_data_intact(store, old):
    prefix, schema = store.table_prefix, store.schema
    with store.engine.begin() as conn:
        assert migrator(store).apply(conn, old) == list(range(1, old + 1))
        rows = fill(conn, old, prefix, schema)

    assert store.migrate() == list(range(old + 1, SCHEMA_VERSION + 1))

    with store.engine.begin() as conn:
        assert read_back(conn, rows, prefix, schema) == rows
        migrator(store, "fresh_").apply(conn)
    with store.engine.connect() as conn:
        assert describe(conn, prefix, schema) == describe(conn, "fresh_", schema)
    assert_store_works(store, old)


def assert_store_works(store: EventStore, old: int) -> None:
    """The upgraded store serves the old data and takes new work, results included."""
    if old >= 1:
        assert [d.delivery for d in store.dead_letters()] == ["d-dead"]
        assert [r.type for r in store.read_stream("task-dead")] == [
            "Published", "Claimed", "DeadLettered"]
        (claimed,) = store.claim(["celery"], 10, "w2", 30)
        assert (claimed.delivery, claimed.message) == ("d-ready", {"body": "ready"})
        assert set(store.ack([claimed.ref]).values()) == {"done"}
    if old >= 2:
        assert store.bindings("celery") == [Binding("celery", "celery", "celery", None, "direct")]
        assert store.take_transient(["reply.celery.pidbox"], 10) == [
            ("reply.celery.pidbox", {"body": "pong"})]
    store.publish([NewMessage(stream="task-new", queue="celery", message={"body": "new"})])
    (claimed,) = store.claim(["celery"], 10, "w2", 30)
    assert claimed.stream == "task-new"
    assert set(store.ack([claimed.ref]).values()) == {"done"}
    store.execute("task-new", lc.Succeed(result={"value": 42}))
    assert store.results(["task-new"])["task-new"][:2] == ("SUCCESS", {"value": 42})


def test_a_new_version_can_alter_a_released_table(store):
    """The shape future versions take: DDL against a table named, not redefined."""

    def v0004_note(prefix: str, schema: str | None) -> list[sa.ClauseElement]:
        messages = sa.Table(f"{prefix}messages", sa.MetaData(schema=schema))
        return [sa.DDL("ALTER TABLE %(fullname)s ADD COLUMN note VARCHAR(64)").against(messages)]

    extended = migrator(store, versions=[*VERSIONS, v0004_note])
    with store.engine.begin() as conn:
        assert extended.apply(conn, SCHEMA_VERSION) == list(range(1, SCHEMA_VERSION + 1))
    with store.engine.begin() as conn:
        assert extended.apply(conn) == [SCHEMA_VERSION + 1]
    with store.engine.connect() as conn:
        columns = sa.inspect(conn).get_columns(store.tables.messages.name, store.schema)
        assert extended.current(conn) == SCHEMA_VERSION + 1
    assert columns[-1]["name"] == "note" and columns[-1]["nullable"]


# -- running them -----------------------------------------------------------------


@pytest.mark.parametrize("old", [0, 1])
def test_migrate_sql_prints_exactly_the_statements_migrate_runs(store, old):
    with store.engine.begin() as conn:
        migrator(store).apply(conn, old)
    printed = run_cli(store, "migrate", "--sql")
    statements = printed.rstrip("\n").removesuffix(";").split(";\n\n")
    assert len(statements) > 2 * (SCHEMA_VERSION - old)  # DDL and a record per version

    with executed_statements() as executed:
        run_cli(store, "migrate")

    start = executed.index(statements[0])
    assert executed[start:start + len(statements)] == statements
    # Around them, only reads: the lock, the version, the driver's own set-up.
    others = executed[:start] + executed[start + len(statements):]
    writes = ("CREATE", "ALTER", "DROP", "INSERT", "UPDATE", "DELETE")
    assert not [s for s in others if s.lstrip().upper().startswith(writes)]
    assert store.schema_version() == SCHEMA_VERSION
    assert run_cli(store, "migrate", "--sql").startswith("-- schema at version")


def test_concurrent_migrations_apply_each_version_once(store):
    processes = 4
    ctx = multiprocessing.get_context("spawn")
    ready, go, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    url = store.url.render_as_string(hide_password=False)
    options = {"schema": store.schema} if store.schema else {}
    procs = [
        ctx.Process(target=migrate_when_told, args=(url, options, ready, go, out))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    go.set()
    applied = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sorted(applied, key=len) == [[]] * (processes - 1) + [
        list(range(1, SCHEMA_VERSION + 1))]
    with store.engine.connect() as conn:
        book = migrator(store).book
        assert conn.execute(sa.select(book.c.version).order_by(book.c.version)).scalars().all() \
            == list(range(1, SCHEMA_VERSION + 1))


def _index_definitions(conn: sa.Connection, prefix: str, schema: str | None) -> set[str]:
    """Every index of ``prefix``'s tables as the catalog writes it, prefix taken out
    (reflection skips expression indexes on SQLite)."""
    if conn.dialect.name == "sqlite":
        rows = conn.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        ).scalars()
    else:
        rows = conn.execute(
            sa.text("SELECT indexdef FROM pg_indexes WHERE schemaname = :schema"),
            {"schema": schema},
        ).scalars()
    return {row.replace(prefix, "") for row in rows if prefix in row}


def test_migrating_creates_the_expression_indexes_of_the_live_tables(store):
    live = make_tables("live_", store.schema)
    with store.engine.begin() as conn:
        migrator(store, "migrated_").apply(conn)
        live.metadata.create_all(conn)
    with store.engine.connect() as conn:
        migrated = _index_definitions(conn, "migrated_", store.schema)
        assert migrated == _index_definitions(conn, "live_", store.schema)
    assert any("events_root_id" in d for d in migrated)
    assert any("events_group" in d for d in migrated)


def test_postgresql_hot_tables_get_their_storage_settings(store):
    if store.dialect_name != "postgresql":
        pytest.skip("storage settings are PostgreSQL's")
    store.migrate()
    with store.engine.connect() as conn:
        options = dict(conn.execute(sa.text(
            "SELECT c.relname, c.reloptions FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = :schema"
        ), {"schema": store.schema}).all())
    messages = options[store.tables.messages.name]
    assert "fillfactor=50" in messages and "autovacuum_vacuum_scale_factor=0" in messages
    assert "autovacuum_analyze_scale_factor=0.02" in options[store.tables.events.name]


def test_a_partitioned_log_has_the_live_tables_with_events_partitioned(postgresql_db):
    """Creating a partitioned log (PostgreSQL) makes the same tables and columns as
    migrating an ordinary one; only ``events`` differs: born is part of its keys,
    and it has a DEFAULT partition (a table of the same prefix)."""
    url, options = postgresql_db
    store = EventStore(url, **options)
    schema = store.schema
    with store.engine.begin() as conn:
        migrator(store, "plain_").apply(conn)
        Migrator(
            dialect_for(store.url), "parted_", schema, partitioned=True
        ).apply(conn)
    with store.engine.connect() as conn:
        plain = describe(conn, "plain_", schema)
        parted = describe(conn, "parted_", schema)
    assert set(parted) == set(plain) | {"events_default"}
    for name in set(plain) - {"events"}:
        assert parted[name] == plain[name], name

    def columns(table):
        return [(c["name"], str(c["type"])) for c in table["columns"]]

    assert columns(parted["events"]) == columns(plain["events"])
    assert parted["events"]["primary_key"]["constrained_columns"] == ["position", "born"]
    assert [u["column_names"] for u in parted["events"]["unique"]] == [
        ["stream_id", "version", "born"]
    ]
    store.close()
