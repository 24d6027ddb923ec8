"""Seeding: a log of many settled tasks, written by the database itself.

Benchmarks and tests need logs of a million finished tasks; publishing, claiming
and acking them through the store takes half an hour.  :func:`seed_settled`
decides one task's life (``Published``, ``Claimed``, ``Acked``) with the lifecycle,
as any write does, and has the database copy it for every number of a range in
one ``INSERT ... SELECT`` per batch, the stream and delivery ids rewritten per
copy.  A settled task leaves one derived row, its entry in the task index
(written by a second ``INSERT ... SELECT``), so the projections stay what a
rebuild would make.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from .. import lifecycle as lc
from .database import Database
from .log import birth_day, evolve_all
from .queries import Queries

#: Stands for the task's number in the template events.
_NUMBER = "~n~"
#: Tasks written per transaction.
SEED_BATCH = 20_000


def seed_settled(
    db: Database,
    queries: Queries,
    count: int,
    *,
    queue: str,
    message: Any,
    stream_prefix: str,
    recorded_at: float,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Append ``count`` settled tasks, streams ``<stream_prefix><n>``; returns ``count``."""
    templates = _templates(queue, message, f"{stream_prefix}{_NUMBER}", recorded_at)
    done = 0
    while done < count:
        last = min(done + SEED_BATCH, count)
        insert = _copies(db, queries, templates, stream_prefix, done + 1, last, recorded_at)
        index = _task_rows(queries, queue, stream_prefix, done + 1, last, recorded_at)
        with db.write() as tx:
            tx.conn.execute(insert)
            tx.conn.execute(index)
        done = last
        if progress is not None:
            progress(done, count)
    return count


def _templates(
    queue: str, message: Any, stream: str, at: float
) -> list[tuple[int, str, str]]:
    """``(version, type, data as JSON)`` of one settled task's events."""
    delivery, claim = f"{stream}.d", f"{stream}.c"
    state = lc.fold(stream, ())
    events: list[lc.Event] = []
    for command in (
        lc.Publish(delivery=delivery, queue=queue, message=message),
        lc.Claim(delivery, claim, "seed", 300.0),
        lc.Ack(delivery, claim),
    ):
        decided = lc.decide(command, state, at)
        state = evolve_all(state, decided)
        events.extend(decided)
    return [
        (version, lc.event_type(event), json.dumps(lc.event_data(event)))
        for version, event in enumerate(events, start=1)
    ]


def _numbers(first: int, last: int) -> Any:
    numbers = sa.select(sa.literal(first, sa.Integer).label("n")).cte("numbers", recursive=True)
    return numbers.union_all(sa.select(numbers.c.n + 1).where(numbers.c.n < last))


def _task_rows(
    queries: Queries, queue: str, stream_prefix: str, first: int, last: int, at: float
) -> sa.Insert:
    """``INSERT ... SELECT``: the task index row of every seeded task (no name, no
    worker: the template is a bare message that nobody started)."""
    tasks = queries.tables.tasks
    numbers = _numbers(first, last)
    select = sa.select(
        sa.literal(stream_prefix, sa.String) + sa.cast(numbers.c.n, sa.String),
        sa.literal(lc.ResultState.PENDING.value, sa.String),
        sa.literal(queue, sa.String),
        sa.literal(at, tasks.c.created_at.type),
    )
    return tasks.insert().from_select(["stream_id", "state", "queue", "created_at"], select)


def _copies(
    db: Database,
    queries: Queries,
    templates: list[tuple[int, str, str]],
    stream_prefix: str,
    first: int,
    last: int,
    at: float,
) -> sa.Insert:
    """``INSERT ... SELECT``: the template events for every number from first to last."""
    ev = queries.tables.events
    numbers = _numbers(first, last)
    template = sa.union_all(*(
        sa.select(
            sa.literal(version, sa.Integer).label("version"),
            sa.literal(type_, sa.String).label("type"),
            sa.literal(data, sa.Text).label("data"),
        )
        for version, type_, data in templates
    )).subquery("template")
    number = sa.cast(numbers.c.n, sa.String)
    data = sa.func.replace(template.c.data, _NUMBER, number)
    select = (
        sa.select(
            sa.literal(stream_prefix, sa.String) + number,
            template.c.version,
            template.c.type,
            db.dialect.json_from_text(data, ev.c.data.type),
            sa.literal(at, ev.c.recorded_at.type),
            sa.literal(birth_day(at), sa.Integer),
        )
        .select_from(numbers.join(template, sa.true()))
        .order_by(numbers.c.n, template.c.version)
    )
    return ev.insert().from_select(
        ["stream_id", "version", "type", "data", "recorded_at", "born"], select
    )
