"""A publish to a new stream in one statement, where the database can take it.

The generic path costs a round trip per statement: the clock, the event, its
queue row, its task-index row, the wake-up.  For one message to a stream that
has no events yet (a new task id: what ``delay()`` sends), this sends them as
one statement of data-modifying CTEs on PostgreSQL: the event row, then the
derived rows made from its position and recorded time, and the "ready" wake-up
in the same statement.

Nothing is decided here: the pure model decides the publish (it does not read
the clock), and the derived rows are the ones :func:`.projection.project` makes
for it -- captured rather than executed, so a projection added later makes this
path step aside (:func:`derived_rows` returns None) instead of skipping it.  A
stream that turns out to exist loses on the ``(stream_id, version)`` key, and
the caller retries on the generic path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from .. import lifecycle as lc
from .projection import captured
from .queries import Queries
from .records import RecordedEvent

#: A day, the unit of an event's ``born`` (as :func:`.log.birth_day` counts).
SECONDS_PER_DAY = 86400


def derived_rows(
    queries: Queries, recorded: RecordedEvent, states: Mapping[str, lc.JobState]
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The queue row and the task-index row the projection makes for one
    publish to a new stream, or None when it makes anything else."""
    calls = captured(queries, [recorded], states)
    made = {id(statement): rows for statement, rows in calls}
    if len(calls) != 2 or set(made) != {id(queries.insert_messages),
                                                 id(queries.insert_tasks)}:
        return None
    (message,), (task,) = made[id(queries.insert_messages)], made[id(queries.insert_tasks)]
    return dict(message), dict(task)


def publish_statement(
    queries: Queries, clock: sa.ColumnElement[Any], notify: Any | None
) -> sa.Select[Any]:
    """The statement: binds the event's columns (``stream_id``, ``type``,
    ``data``, ``metadata``; ``now``, or NULL for the database's ``clock``), the
    queue row's and task row's columns prefixed ``m_`` and ``t_`` (without the
    position and time, which come from the event row), and with ``notify`` --
    a function of (channel, payload) making the wake-up -- ``channel`` and
    ``queue``.  Returns the event's ``position`` and ``recorded_at``."""
    t = queries.tables
    ev, msgs, tasks = t.events, t.messages, t.tasks
    recorded_at = sa.func.coalesce(sa.bindparam("now", type_=ev.c.recorded_at.type), clock)
    event = (
        ev.insert()
        .values(
            stream_id=sa.bindparam("stream_id", type_=ev.c.stream_id.type),
            version=1,
            type=sa.bindparam("type", type_=ev.c.type.type),
            data=sa.bindparam("data", type_=ev.c.data.type),
            metadata=sa.bindparam("metadata", type_=ev.c.metadata.type),
            recorded_at=recorded_at,
            # birth_day() of that time, as the generic path records it.
            born=sa.cast(sa.func.floor(recorded_at / SECONDS_PER_DAY), sa.Integer),
        )
        .returning(ev.c.position, ev.c.recorded_at)
        .cte("published")
    )

    def derived(table: sa.Table, prefix: str, from_event: Mapping[str, sa.ColumnElement[Any]],
                name: str) -> sa.CTE:
        columns = [c.name for c in table.columns]
        values = [
            from_event[c] if c in from_event
            else sa.bindparam(f"{prefix}{c}", type_=table.c[c].type)
            for c in columns
        ]
        return table.insert().from_select(columns, sa.select(*values)).cte(name)

    queued = derived(msgs, "m_", {"seq": event.c.position}, "queued")
    indexed = derived(tasks, "t_", {"created_at": event.c.recorded_at}, "indexed")
    returned: list[sa.ColumnElement[Any]] = [event.c.position, event.c.recorded_at]
    woken = notify(sa.bindparam("channel"), sa.bindparam("queue")) if notify else None
    if woken is not None:
        returned.append(woken.label("woken"))
    return sa.select(*returned).add_cte(queued, indexed)


def publish_parameters(
    row: Mapping[str, Any], message: Mapping[str, Any], task: Mapping[str, Any],
    now: float | None,
) -> dict[str, Any]:
    """The statement's parameters for one event row and its derived rows."""
    params = {key: row[key] for key in ("stream_id", "type", "data", "metadata")}
    params["now"] = now
    params.update({f"m_{k}": v for k, v in message.items() if k != "seq"})
    params.update({f"t_{k}": v for k, v in task.items() if k != "created_at"})
    return params


def recorded_after(
    row: Mapping[str, Any], event: lc.Event, position: int, recorded_at: float
) -> RecordedEvent:
    return RecordedEvent(
        position=position, stream=row["stream_id"], version=1, event=event,
        metadata=row["metadata"], recorded_at=recorded_at,
        born=int(recorded_at // SECONDS_PER_DAY),
    )


__all__: Sequence[str] = ["derived_rows", "publish_parameters", "publish_statement"]
