"""One corrupt event row costs its own stream, never the queue (issue 10, item 3).

A row is broken the ways a disk, a bad manual UPDATE or a downgrade break rows: JSON
that no longer parses (SQLite stores text), an event type this version does not
know, data missing a field, a version gap.  Claims quarantine the stream's messages
as dead letters naming the position and the reason, the other messages keep
flowing, and ``check``, ``rebuild``, ``tail`` and ``history`` report the stream and
go on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from celery_eventstore import lifecycle as lc
from celery_eventstore.cli import eventstore
from celery_eventstore.storage import EventStore, NewMessage

CORRUPTIONS = {
    # name: (dialects it applies to, the UPDATE's values or "delete")
    "bad json": ({"sqlite"}, {"data": sa.literal_column("'{\"delivery\": '")}),
    "unknown type": ({"sqlite", "postgresql"}, {"type": "NoSuchEvent"}),
    "missing field": ({"sqlite", "postgresql"}, {"data": sa.literal_column("'{}'")}),
}


@pytest.fixture
def store(db: tuple[str, dict[str, Any]]) -> Iterator[EventStore]:
    url, options = db
    store = EventStore(url, **options)
    store.migrate()
    yield store
    store.close()


def publish(store: EventStore, *streams: str) -> None:
    store.publish([NewMessage(stream=s, queue="q", message={"body": s}) for s in streams])


def corrupt(store: EventStore, stream: str, how: str, version: int = 1) -> int:
    """Break one stored event the way ``how`` says; returns its position."""
    dialects, values = CORRUPTIONS[how]
    if store.dialect_name not in dialects:
        pytest.skip(f"{store.dialect_name} cannot hold {how}")
    ev = store.tables.events
    row = (ev.c.stream_id == stream) & (ev.c.version == version)
    with store.engine.begin() as conn:
        position = conn.execute(sa.select(ev.c.position).where(row)).scalar_one()
        if store.dialect_name == "postgresql" and "data" in values:
            values = {"data": sa.cast(values["data"], sa.dialects.postgresql.JSONB)}
        conn.execute(ev.update().where(row).values(**values))
    return int(position)


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_the_corrupt_stream_is_quarantined_and_the_queue_flows(store, how):
    publish(store, "a", "b", "c")
    position = corrupt(store, "b", how)

    claimed = store.claim(["q"], 10, "worker", 30)

    assert sorted(m.stream for m in claimed) == ["a", "c"]
    [letter] = store.dead_letters()
    assert letter.stream == "b" and letter.queue == "q"
    assert f"position {position}" in letter.reason
    assert store.queue_size("q") == 0
    assert set(store.ack([m.ref for m in claimed]).values()) == {"done"}
    publish(store, "d")
    assert [m.stream for m in store.claim(["q"], 10, "worker", 30)] == ["d"]


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_a_purge_quarantines_the_corrupt_stream_and_discards_the_rest(store, how):
    publish(store, "a", "b", "c")
    position = corrupt(store, "b", how)

    assert store.purge("q") == 2

    assert store.queue_size("q") == 0
    [letter] = store.dead_letters()
    assert letter.stream == "b" and f"position {position}" in letter.reason
    assert [r.type for r in store.read_stream("a")] == ["Published", "Discarded"]


def test_a_purge_leaves_a_queue_row_the_log_does_not_bear_out_and_goes_on(store, caplog):
    """A queue row naming a delivery its stream never had (a hand-edited row) is
    not a message the log knows: the purge leaves it, says so, and purges the rest."""
    publish(store, "a", "b", "c")
    msgs = store.tables.messages
    with store.engine.begin() as conn:
        conn.execute(msgs.update().where(msgs.c.stream_id == "b").values(delivery_id="bogus"))

    assert store.purge("q") == 2

    assert store.queue_size("q") == 1
    assert "has no delivery 'bogus'" in caplog.text and "celery-eventstore check" in caplog.text
    assert store.dead_letters() == []


def test_a_version_gap_is_quarantined(store):
    publish(store, "a", "b")
    assert len(store.claim(["q"], 2, "worker", 0.05)) == 2
    ev = store.tables.events
    row = (ev.c.stream_id == "b") & (ev.c.version == 2)
    with store.engine.begin() as conn:  # b's Claimed moves to version 3: a gap
        position = conn.execute(sa.select(ev.c.position).where(row)).scalar_one()
        conn.execute(ev.update().where(row).values(version=3))
    time.sleep(0.1)

    # The leases ran out: the next claim finds the gap instead of re-delivering b.
    claimed = store.claim(["q"], 10, "other", 30, max_claims=5)
    assert [m.stream for m in claimed] == ["a"]
    [letter] = store.dead_letters()
    assert letter.stream == "b" and "version 3 follows 1" in letter.reason
    assert f"position {position}" in letter.reason


def test_an_ack_for_a_stream_corrupted_under_its_holder_is_fenced(store):
    publish(store, "a", "b")
    held = {m.stream: m for m in store.claim(["q"], 2, "worker", 30)}
    corrupt(store, "b", "unknown type")

    outcomes = store.ack([held["a"].ref, held["b"].ref])

    assert outcomes == {held["a"].delivery: "done", held["b"].delivery: "stale"}
    assert [letter.stream for letter in store.dead_letters()] == ["b"]


def test_reads_report_the_unreadable_event_and_go_on(store):
    publish(store, "a", "b", "c")
    position = corrupt(store, "b", "unknown type")

    log = store.read_all()
    assert [r.stream for r in log] == ["a", "b", "c"]
    assert isinstance(log[1].event, lc.Unreadable) and "NoSuchEvent" in log[1].event.reason
    [error] = store.unreadable_streams()
    assert (error.stream, error.position) == ("b", position)


def _cli(store: EventStore, *args: str) -> Any:
    options = ["--url", str(store.url.render_as_string(hide_password=False))]
    if store.schema:
        options += ["--schema", store.schema]
    return CliRunner().invoke(eventstore, [*options, *args], catch_exceptions=False)


def test_cli_check_rebuild_tail_and_history_name_it_and_go_on(store):
    publish(store, "a", "b", "c")
    position = corrupt(store, "b", "missing field")
    store.claim(["q"], 10, "worker", 30)  # quarantines b
    before = store.projection_rows()

    check = _cli(store, "check")
    assert check.exit_code == 2, check.output
    assert f"'b': unreadable event at position {position}" in check.output

    rebuild = _cli(store, "rebuild")
    assert rebuild.exit_code == 0, rebuild.output
    assert f"unreadable stream 'b': unreadable event at position {position}" in rebuild.output
    assert store.projection_rows() == before

    tail = _cli(store, "tail", "-n", "100")
    assert tail.exit_code == 0, tail.output
    assert "Unreadable" in tail.output and "Quarantined" in tail.output

    history = _cli(store, "history", "b")
    assert history.exit_code == 0, history.output
    assert f"state=UNREADABLE (position {position}" in history.output
    assert _cli(store, "history", "a").exit_code == 0


def test_rebuild_quarantines_a_corrupt_stream_nobody_claimed_yet(store):
    publish(store, "a", "b")
    position = corrupt(store, "b", "unknown type")
    reported: list[Any] = []

    store.rebuild(on_unreadable=reported.append)

    assert [(e.stream, e.position) for e in reported] == [("b", position)]
    assert [letter.stream for letter in store.dead_letters()] == ["b"]
    assert [m.stream for m in store.claim(["q"], 10, "worker", 30)] == ["a"]
