"""Names the store cannot keep are refused with one clear error, before any SQL.

Task ids, delivery ids, queue names, exchange names and routing keys longer than
their columns, or holding a NUL character, used to give a driver error on
PostgreSQL (psycopg2's raw ``ValueError`` for a NUL) and to be stored silently on
SQLite.  Every command that would write one now raises ``InvalidName`` with the
limit, sends no SQL and writes nothing; queries answer that nothing has the name.
``table_prefix`` and ``schema`` are checked when the store is created.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from storehelpers import executed_statements

from celery_eventstore import lifecycle as lc
from celery_eventstore.exceptions import ConfigurationError, EventStoreError, InvalidName
from celery_eventstore.storage import EventStore, NewMessage
from celery_eventstore.storage.names import (
    MAX_IDENTIFIER,
    MAX_PREFIX,
    derived_names,
)
from celery_eventstore.storage.notifiers import Channels
from celery_eventstore.storage.routing import Binding, QueueInfo

LIMIT = 255
LONG = "x" * (LIMIT + 1)
NUL = "bad\x00name"
SECRET_BODY = "the-message-body-must-not-appear"



@pytest.fixture
def store(db: tuple[Any, dict[str, Any]]) -> Iterator[EventStore]:
    url, options = db
    store = EventStore(url, **options)
    store.migrate()
    # Something to stay unchanged: a declared queue with a message, and a binding.
    store.declare_queue(QueueInfo("q", transient=False))
    store.bind(Binding("ex", "q", "rk", None, "direct"))
    store.publish([NewMessage(stream="t0", queue="q", message={"body": "ok"})])
    yield store
    store.close()


def snapshot(store: EventStore) -> dict[str, Any]:
    """The log, the derived tables and the routing state."""
    return {
        "log": [(r.position, r.stream, r.version, r.type) for r in store.read_all()],
        "projections": store.projection_rows(),
        "queue": store.queue_size("q"),
        "bindings": store.bindings("ex"),
        "queues": store.queue_info(["q", "t"]),
        "transient": store.transient_size("t"),
    }


def message(stream: str = "t1", queue: str = "q", **fields: Any) -> NewMessage:
    return NewMessage(stream=stream, queue=queue, message={"body": SECRET_BODY}, **fields)


Command = Callable[[EventStore], Any]

TOO_LONG = f"the limit is {LIMIT}"
HAS_NUL = "contains a NUL character"

#: (what is wrong, the command, the field the message names, what it says of it)
BAD_COMMANDS: list[tuple[str, Command, str, str]] = [
    ("publish: long task id", lambda s: s.publish([message(LONG)]), "task id", TOO_LONG),
    ("publish: NUL task id", lambda s: s.publish([message(NUL)]), "task id", HAS_NUL),
    ("publish: long queue", lambda s: s.publish([message(queue=LONG)]), "queue name", TOO_LONG),
    ("publish: NUL queue", lambda s: s.publish([message(queue=NUL)]), "queue name", HAS_NUL),
    ("publish: long delivery id",
     lambda s: s.publish([message(delivery=LONG)]), "delivery id", TOO_LONG),
    ("publish: one bad in a batch",
     lambda s: s.publish([message("t2"), message(LONG)]), "task id", TOO_LONG),
    ("execute: group prefix counts",
     lambda s: s.execute("group:" + "g" * (LIMIT - 5), lc.SaveGroup(result={})),
     "task id", TOO_LONG),
    ("execute: NUL", lambda s: s.execute(NUL, lc.Revoke()), "task id", HAS_NUL),
    ("append: long", lambda s: s.append(LONG, [lc.Revoked()], 0), "task id", TOO_LONG),
    ("revoke: long", lambda s: s.revoke(LONG), "task id", TOO_LONG),
    ("revoke: NUL", lambda s: s.revoke(NUL), "task id", HAS_NUL),
    ("declare_queue: long",
     lambda s: s.declare_queue(QueueInfo(LONG, False)), "queue name", TOO_LONG),
    ("declare_queue: NUL",
     lambda s: s.declare_queue(QueueInfo(NUL, True)), "queue name", HAS_NUL),
    ("bind: long exchange",
     lambda s: s.bind(Binding(LONG, "q", "rk", None, "direct")), "exchange name", TOO_LONG),
    ("bind: NUL exchange",
     lambda s: s.bind(Binding(NUL, "q", "rk", None, "direct")), "exchange name", HAS_NUL),
    ("bind: long queue",
     lambda s: s.bind(Binding("ex", LONG, "rk", None, "direct")), "queue name", TOO_LONG),
    ("bind: long routing key",
     lambda s: s.bind(Binding("ex", "q", LONG, None, "topic")), "routing key", TOO_LONG),
    ("bind: NUL routing key",
     lambda s: s.bind(Binding("ex", "q", NUL, None, "topic")), "routing key", HAS_NUL),
    ("bind: long pattern",
     lambda s: s.bind(Binding("ex", "q", "rk", "p" * 1025, "topic")),
     "binding pattern", "the limit is 1024"),
    ("bind: long exchange type",
     lambda s: s.bind(Binding("ex", "q", "rk", None, "t" * 33)),
     "exchange type", "the limit is 32"),
    ("unbind: long routing key", lambda s: s.unbind("ex", "q", LONG), "routing key", TOO_LONG),
    ("unbind: NUL exchange", lambda s: s.unbind(NUL, "q", "rk"), "exchange name", HAS_NUL),
    ("put_transient: long queue",
     lambda s: s.put_transient([("t", {"b": 1}, 0, None), (LONG, {"b": 2}, 0, None)]),
     "queue name", TOO_LONG),
    ("put_transient: NUL queue",
     lambda s: s.put_transient([(NUL, {"b": 1}, 0, None)]), "queue name", HAS_NUL),
    ("claim: long consumer",
     lambda s: s.claim(["q"], 1, LONG, 30), "consumer name", TOO_LONG),
    ("claim: NUL queue", lambda s: s.claim([NUL], 1, "c", 30), "queue name", HAS_NUL),
    ("retry_dead: long delivery", lambda s: s.retry_dead(LONG), "delivery id", TOO_LONG),
    ("purge: NUL queue", lambda s: s.purge(NUL), "queue name", HAS_NUL),
]


@pytest.mark.parametrize(
    "command, field, says", [c[1:] for c in BAD_COMMANDS], ids=[c[0] for c in BAD_COMMANDS]
)
def test_a_name_that_cannot_be_stored_is_refused_before_any_sql(
    store: EventStore, command: Command, field: str, says: str
) -> None:
    before = snapshot(store)
    with executed_statements() as sent, pytest.raises(Exception) as info:
        command(store)
    error = info.value
    assert type(error) is InvalidName, f"{type(error).__module__}.{type(error).__name__}: {error}"
    assert isinstance(error, ValueError) and isinstance(error, EventStoreError)
    text = str(error)
    assert text.startswith(field) and says in text, text
    assert len(text) < 200 and "\n" not in text and SECRET_BODY not in text
    assert error.__cause__ is None and error.__context__ is None
    assert sent == []  # refused before the database saw anything
    assert snapshot(store) == before


def test_the_message_names_the_length_and_the_limit(store: EventStore) -> None:
    with pytest.raises(InvalidName) as info:
        store.publish([message("y" * 300)])
    assert str(info.value) == (
        f"task id {'y' * 40!r}... is 300 characters long; the limit is {LIMIT} "
        "(a group:/chord: stream counts its prefix)"
    )
    with pytest.raises(InvalidName, match="contains a NUL character"):
        store.declare_queue(QueueInfo("a\x00b", False))


def test_names_at_the_limit_are_kept_whole(store: EventStore) -> None:
    stream, queue = "s" * LIMIT, "q" * LIMIT
    store.declare_queue(QueueInfo(queue, False))
    store.bind(Binding("e" * LIMIT, queue, "k" * LIMIT, None, "direct"))
    (delivery,) = store.publish([message(stream, queue, delivery="d" * LIMIT)])
    (claimed,) = store.claim([queue], 1, "c" * LIMIT, 30)
    assert (claimed.stream, claimed.queue, claimed.delivery) == (stream, queue, delivery)
    assert store.ack([claimed.ref]) == {delivery: "done"}
    assert [r.type for r in store.read_stream(stream)] == ["Published", "Claimed", "Acked"]
    assert store.bindings("e" * LIMIT)[0].routing_key == "k" * LIMIT
    store.execute("group:" + "g" * (LIMIT - 6), lc.SaveGroup(result={}))


@pytest.mark.parametrize("bad", [LONG, NUL])
def test_queries_find_nothing_by_a_name_that_cannot_exist(store: EventStore, bad: str) -> None:
    with executed_statements() as sent:
        assert store.read_stream(bad) == []
        assert store.load(bad).version == 0
        assert store.results([bad]) == {}
        assert store.queue_size(bad) == 0
        assert store.queue_exists(bad) is False
        assert store.queue_info([bad]) == {}
        assert store.bindings(bad) == []
        assert store.transient_size(bad) == 0
        assert store.dead_letters(bad) == []
        assert store.take_transient([bad], 10) == []
    assert sent == []
    assert store.results([bad, "t0"]).keys() <= {"t0"}  # the good ones are still read


# -- table_prefix and schema ---------------------------------------------------------


@pytest.mark.parametrize(
    "prefix", ["my-app_", "1app_", "app_\u00e9", "a b", 'x";drop table y;--', "app.", "a\x00"]
)
def test_a_table_prefix_that_is_not_a_plain_identifier_is_refused(tmp_path, prefix) -> None:
    path = tmp_path / "never.db"
    with pytest.raises(ConfigurationError, match="ASCII letters, digits and underscores"):
        EventStore(f"sqlite:///{path}", table_prefix=prefix)
    assert not path.exists()


@pytest.mark.parametrize("schema", ["my-schema", "9s", "s.t", " ", "sch\u00e9ma"])
def test_a_schema_that_is_not_a_plain_identifier_is_refused(schema) -> None:
    with pytest.raises(ConfigurationError, match="ASCII letters, digits and underscores"):
        EventStore("postgresql://nobody@127.0.0.1:1/none", schema=schema)


def test_the_longest_derived_name_sets_the_prefix_limit() -> None:
    assert MAX_PREFIX == 38  # + "transient_messages_id_seq" = 63
    assert max(len(n) for n in derived_names("p" * MAX_PREFIX)) == MAX_IDENTIFIER
    with pytest.raises(ConfigurationError, match=f"the limit is {MAX_PREFIX}"):
        EventStore("sqlite://", table_prefix="p" * (MAX_PREFIX + 1))
    EventStore("sqlite://", table_prefix="p" * MAX_PREFIX).close()
    EventStore("sqlite://", table_prefix="").close()
    EventStore("sqlite://", schema="").close()  # no schema, as before


@pytest.mark.parametrize("schema", [None, "s", "s" * 40, "s" * MAX_IDENTIFIER])
@pytest.mark.parametrize("prefix", ["", "eventstore_", "p" * MAX_PREFIX])
def test_channel_names_fit_for_any_schema_and_prefix(schema, prefix) -> None:
    """Every NOTIFY channel fits PostgreSQL's 63 bytes, whatever the namespace; two
    namespaces never share a channel, nor two tasks a result channel."""
    channels = Channels(prefix, schema)
    names = [channels.ready, channels.result("a"), channels.result("b" * 255)]
    assert all(len(n.encode()) <= MAX_IDENTIFIER for n in names), names
    assert len(set(names)) == 3
    other = Channels(prefix + "x" if len(prefix) < MAX_PREFIX else "x", schema)
    assert {other.ready, other.result("a")}.isdisjoint(names)


def test_a_schema_longer_than_an_identifier_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=f"the limit is {MAX_IDENTIFIER}"):
        EventStore("postgresql://nobody@127.0.0.1:1/none", schema="s" * (MAX_IDENTIFIER + 1))
    EventStore(
        "postgresql://nobody@127.0.0.1:1/none", table_prefix="p" * MAX_PREFIX,
        schema="s" * MAX_IDENTIFIER,
    ).close()


@pytest.fixture
def long_schema(postgresql_url: str) -> Iterator[tuple[str, str]]:
    """A schema as long as the longest allowed prefix leaves room for."""
    schema = f"s{uuid.uuid4().hex}" + "s" * (MAX_IDENTIFIER - 33)
    engine = sa.create_engine(postgresql_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.schema.CreateSchema(schema))
    try:
        yield postgresql_url, schema
    finally:
        with engine.begin() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=True))
        engine.dispose()


def test_the_longest_namespace_allowed_works_on_postgresql(long_schema) -> None:
    """Every derived name is kept whole (PostgreSQL would truncate one past 63
    bytes) and the NOTIFY channels, shortened to fit, wake listeners."""
    url, schema = long_schema
    prefix = "p" * (MAX_PREFIX - 1) + "_"
    store = EventStore(url, table_prefix=prefix, schema=schema)
    try:
        assert len(store.channels.result("t")) <= MAX_IDENTIFIER
        store.migrate()
        with store.engine.connect() as conn:
            relations = set(conn.execute(
                sa.text(
                    "SELECT c.relname FROM pg_class c JOIN pg_namespace n "
                    "ON n.oid = c.relnamespace WHERE n.nspname = :schema"
                ),
                {"schema": schema},
            ).scalars())
        assert relations == set(derived_names(prefix))
        listener = store.listener(results=["t"])
        ready = store.listener()
        try:
            listener.poll()
            store.execute("t", lc.Revoke())
            assert listener.wait(5.0) == {"t"}
            store.publish([NewMessage(stream="m", queue="q", message={})])
            assert ready.wait(5.0) == {"q"}
        finally:
            listener.close()
            ready.close()
    finally:
        store.close()
