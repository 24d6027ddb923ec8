"""The task index: one row per task stream, kept by the append transaction.

:func:`project_tasks` runs inside :func:`.projection.project`, for live appends
and rebuilds alike, so the rows come from the events alone.  A stream's row is
inserted with its first event (name, queue and links from its first message's
metadata) and changed only by events that change what it holds -- a publish (the
queue), a start (the worker), a result or a settlement that changes the state --
so claims, renewals and acks cost it nothing.  A stream quarantined as unreadable
leaves the index (``check`` and ``dead`` name it): what its row said can no
longer be told from the log, so a rebuild could not bring it back.  :class:`TaskIndex` answers
:meth:`EventStore.tasks` from it with an index lookup, not a scan of the log.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from .. import lifecycle as lc
from .database import Database
from .execution import execute_rows
from .queries import Queries
from .records import RecordedEvent, TaskFilter, TaskSummary

#: Events that may change a task's state.
_STATE_EVENTS = (
    lc.Started, lc.StateUpdated, lc.RetryScheduled, lc.Succeeded, lc.Failed, lc.Revoked,
    lc.DeadLettered, lc.Discarded,
)
#: The links a task's first message names, by their metadata key.
_LINKS = {"name": "task", "parent_id": "parent_id", "root_id": "root_id", "group_id": "group"}
#: The widest value a column holds (headers are the application's).
_WIDTH = 255


def project_tasks(
    conn: sa.Connection,
    queries: Queries,
    recorded: Iterable[RecordedEvent],
    states: Mapping[str, lc.JobState],
) -> None:
    """Apply ``recorded`` (in log order) to the task index."""
    inserts: dict[str, dict[str, Any]] = {}
    updates: dict[str, dict[str, Any]] = {}
    unreadable: set[str] = set()
    for rec in recorded:
        if lc.stream_kind(rec.stream) is not lc.StreamKind.TASK:
            continue
        ev, stream = rec.event, rec.stream
        if isinstance(ev, lc.Quarantined):
            unreadable.add(stream)
            continue
        row = inserts.get(stream)
        if rec.version == 1:
            row = inserts[stream] = {
                "stream_id": stream, "created_at": rec.recorded_at, "queue": None,
                "worker": None, "state": lc.ResultState.PENDING.value,
                **{column: _clip((rec.metadata or {}).get(key)) for column, key in _LINKS.items()},
            }
        changes = row if row is not None else updates.setdefault(stream, {})
        if isinstance(ev, lc.Published):
            changes["queue"] = ev.queue
        elif isinstance(ev, lc.Started) and ev.worker:
            changes["worker"] = _clip(ev.worker)
        if (isinstance(ev, _STATE_EVENTS) or row is not None) and stream in states:
            changes["state"] = _clip(_state_of(states[stream]))
    inserted = [row for stream, row in inserts.items() if stream not in unreadable]
    if inserted:
        execute_rows(conn, queries.insert_tasks, inserted)
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for stream, changes in updates.items():
        if changes and stream not in unreadable:
            by_columns.setdefault(tuple(sorted(changes)), []).append(
                {**changes, "b_stream_id": stream}
            )
    for columns, rows in by_columns.items():
        execute_rows(conn, queries.update_tasks(columns), rows)
    if unreadable:
        conn.execute(queries.delete_tasks, {"streams": sorted(unreadable)})


def _state_of(state: lc.JobState) -> str:
    return state.custom_state or state.result_state.value


def _clip(value: Any) -> str | None:
    return None if value in (None, "") else str(value)[:_WIDTH]


class TaskIndex:
    """Finds tasks by what the index holds."""

    def __init__(self, db: Database, queries: Queries) -> None:
        self.db = db
        self.queries = queries

    def tasks(self, where: TaskFilter, limit: int = 50) -> list[TaskSummary]:
        """Tasks matching ``where``, newest first (then by id, descending): a stable
        order, served by an index whichever one field selects."""
        given = where.given()
        statement = self.queries.list_tasks(tuple(sorted(given)))
        with self.db.read() as conn:
            rows = conn.execute(statement, {**given, "limit": limit})
            return [_summary(row) for row in rows]

    def summaries(self, task_ids: Sequence[str]) -> dict[str, TaskSummary]:
        """The index rows of those tasks that have one."""
        wanted = sorted(set(task_ids))
        if not wanted:
            return {}
        with self.db.read() as conn:
            rows = conn.execute(self.queries.tasks_by_id, {"streams": wanted})
            return {row.stream_id: _summary(row) for row in rows}


def _summary(row: Any) -> TaskSummary:
    return TaskSummary(
        task_id=row.stream_id, name=row.name, state=row.state, queue=row.queue,
        worker=row.worker, parent_id=row.parent_id, root_id=row.root_id,
        group_id=row.group_id, created_at=row.created_at,
    )
