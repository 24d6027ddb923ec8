"""Keeps the derived tables in step with the log.

The same code runs for a live append (in the append's transaction) and for a
rebuild from the log, which is what makes the projections rebuildable: a row's
every column comes from the events alone.  Events touching one delivery are
coalesced first, so a batch of claims costs one statement per kind of change,
not one per event.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from ..lifecycle import (
    Acked,
    ChordCompleted,
    ChordPartDone,
    Claimed,
    DeadLettered,
    DeadLetterPurged,
    Discarded,
    Failed,
    Forgotten,
    GroupDeleted,
    GroupSaved,
    JobState,
    LeaseExpired,
    LeaseRenewed,
    Published,
    Quarantined,
    Requeued,
    ResultExpired,
    ResultState,
    RetryScheduled,
    Revoked,
    Started,
    StateUpdated,
    Succeeded,
)
from .chords import chord_row, part_rows
from .execution import execute_rows
from .queries import Queries
from .records import RecordedEvent
from .task_index import project_tasks

#: Events that change what the result backend reports.
_RESULT_EVENTS = (
    Started, StateUpdated, RetryScheduled, Succeeded, Failed, Revoked, Forgotten, GroupSaved,
    GroupDeleted, ResultExpired,
)
_READY = {ResultState.SUCCESS, ResultState.FAILURE, ResultState.REVOKED}

#: A row that was inserted earlier and is being changed.
_UPDATE = "update"
_INSERT = "insert"
_DELETE = "delete"


def _unclaimed(available_at: float) -> dict[str, Any]:
    return {
        "claim_id": None,
        "consumer": None,
        "claimed_at": None,
        "lease_until": None,
        "available_at": available_at,
    }


def project(
    conn: sa.Connection,
    queries: Queries,
    recorded: Sequence[RecordedEvent],
    states: Mapping[str, JobState],
) -> None:
    """Apply ``recorded`` (in log order) to the derived tables.

    ``states`` holds each touched stream folded up to and including ``recorded``.
    """
    changes: dict[str, tuple[str, dict[str, Any]]] = {}
    dead: list[dict[str, Any]] = []
    results: dict[str, float] = {}  # stream -> time of its last result change
    retried: list[str] = []  # dead letters published again or purged
    chords: dict[str, list[str]] = {}  # chord stream -> parts counted in this batch
    for rec in recorded:
        ev = rec.event
        if isinstance(ev, (ChordPartDone, ChordCompleted)):
            counted = chords.setdefault(rec.stream, [])
            if isinstance(ev, ChordPartDone):
                counted.append(ev.task_id)
            continue
        if isinstance(ev, (_RESULT_EVENTS, DeadLettered)) or (
            isinstance(ev, Discarded) and ev.reason == "expired"
        ):
            results[rec.stream] = rec.recorded_at
        if isinstance(ev, Published):
            if ev.retry_of is not None:
                retried.append(ev.retry_of)
            changes[ev.delivery] = (
                _INSERT,
                {
                    "delivery_id": ev.delivery,
                    "stream_id": rec.stream,
                    "queue": ev.queue,
                    "priority": ev.priority,
                    "seq": rec.position,
                    "not_before": ev.not_before,
                    "expires": ev.expires,
                    **_unclaimed(ev.not_before or 0.0),
                },
            )
        elif isinstance(ev, Claimed):
            _merge(changes, ev.delivery, {
                "claim_id": ev.claim,
                "consumer": ev.consumer,
                "claimed_at": rec.recorded_at,
                "lease_until": ev.lease_until,
                "available_at": ev.lease_until,
            })
        elif isinstance(ev, LeaseRenewed):
            _merge(changes, ev.delivery, {
                "lease_until": ev.lease_until,
                "available_at": ev.lease_until,
            })
        elif isinstance(ev, Requeued):
            _merge(changes, ev.delivery, {
                **_unclaimed(ev.not_before or 0.0),
                "not_before": ev.not_before,
            })
        elif isinstance(ev, LeaseExpired):
            _merge(changes, ev.delivery, _unclaimed(0.0))
        elif isinstance(ev, (Acked, Discarded)):
            _delete(changes, ev.delivery)
        elif isinstance(ev, DeadLetterPurged):
            retried.append(ev.delivery)
        elif isinstance(ev, Quarantined):  # its stream cannot say the queue
            _delete(changes, ev.delivery)
            dead.append({
                "delivery_id": ev.delivery,
                "stream_id": rec.stream,
                "queue": ev.queue,
                "reason": ev.reason,
                "dead_at": rec.recorded_at,
                "position": rec.position,
            })
        elif isinstance(ev, DeadLettered):
            _delete(changes, ev.delivery)
            dead.append({
                "delivery_id": ev.delivery,
                "stream_id": rec.stream,
                "queue": states[rec.stream].delivery(ev.delivery).queue,
                "reason": ev.reason,
                "dead_at": rec.recorded_at,
                "position": rec.position,
            })
    _write(conn, queries, changes, dead)
    if retried:
        conn.execute(queries.delete_dead_letters, {"deliveries": retried})
    _write_results(conn, queries, results, states)
    project_tasks(conn, queries, recorded, states)
    _write_chords(conn, queries, chords, states)


class _Capture:
    """Stands in for a connection: keeps what :func:`project` would execute."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any]] = []

    def execute(self, statement: Any, parameters: Any = None) -> None:
        # Rows as a list, however they were given (one row comes as a mapping).
        rows = [parameters] if isinstance(parameters, Mapping) else parameters
        self.calls.append((statement, rows))


def captured(
    queries: Queries, recorded: Sequence[RecordedEvent], states: Mapping[str, JobState]
) -> list[tuple[Any, Any]]:
    """What :func:`project` would execute for ``recorded``, without executing it:
    each statement with its parameters, in order.  A writer that folds the
    derived rows into a statement of its own takes them from here, so a
    projection added later reaches it too (or makes it step aside)."""
    capture = _Capture()
    project(capture, queries, recorded, states)  # type: ignore[arg-type]
    return capture.calls


def _merge(changes: dict[str, tuple[str, dict[str, Any]]], delivery: str,
           values: dict[str, Any]) -> None:
    kind, row = changes.get(delivery, (_UPDATE, {"delivery_id": delivery}))
    if kind == _DELETE:
        return
    changes[delivery] = (kind, {**row, **values})


def _delete(changes: dict[str, tuple[str, dict[str, Any]]], delivery: str) -> None:
    kind, _ = changes.get(delivery, (_UPDATE, {}))
    if kind == _INSERT:
        # Published and settled within one batch: the row never needs to exist.
        del changes[delivery]
    else:
        changes[delivery] = (_DELETE, {"delivery_id": delivery})


def _write(conn: sa.Connection, queries: Queries,
           changes: dict[str, tuple[str, dict[str, Any]]], dead: list[dict[str, Any]]) -> None:
    inserts = [row for kind, row in changes.values() if kind == _INSERT]
    deletes = [row["delivery_id"] for kind, row in changes.values() if kind == _DELETE]
    updates: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for kind, row in changes.values():
        if kind == _UPDATE:
            updates.setdefault(tuple(sorted(row)), []).append(row)

    if inserts:
        execute_rows(conn, queries.insert_messages, inserts)
    for columns, rows in updates.items():
        execute_rows(
            conn, queries.update_messages(columns),
            [{**r, "b_delivery_id": r["delivery_id"]} for r in rows],
        )
    if deletes:
        conn.execute(queries.delete_messages, {"deliveries": deletes})
    if dead:
        execute_rows(conn, queries.insert_dead_letters, dead)


def _write_results(
    conn: sa.Connection, queries: Queries, touched: Mapping[str, float],
    states: Mapping[str, JobState],
) -> None:
    gone, rows = [], []
    for stream, at in touched.items():
        state = states[stream]
        if state.forgotten or (state.result_state is ResultState.PENDING and state.result is None):
            gone.append(stream)
            continue
        rows.append({
            "stream_id": stream,
            "state": state.custom_state or state.result_state.value,
            "result": dict(state.result) if state.result is not None else None,
            "date_done": at if state.result_state in _READY else None,
        })
    if rows:  # one statement for the batch (each stream once: ``touched`` is keyed by it)
        execute_rows(conn, queries.upsert_result, rows)
    if gone:
        conn.execute(queries.delete_results, {"streams": gone})


def _write_chords(
    conn: sa.Connection, queries: Queries, counted: Mapping[str, list[str]],
    states: Mapping[str, JobState],
) -> None:
    """Each touched chord's count as of ``states``, and the parts it counted now."""
    if not counted:
        return
    parts = [row for stream, ids in counted.items() for row in part_rows(stream, ids)]
    if parts:
        conn.execute(queries.insert_chord_parts, parts)
    conn.execute(queries.upsert_chord, [chord_row(states[stream]) for stream in counted])
