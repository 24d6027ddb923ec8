"""Chord counters: counting a chord's part reads one row, not the chord's stream.

Every finished header task appends ``ChordPartDone`` to ``chord:<group id>``,
and the part that reaches the chord's size appends ``ChordCompleted`` too.
Deciding that needs the count, whether the chord completed and whether this very
part was counted before -- which the ``chords`` and ``chord_parts`` tables hold,
written by the projection in the append's transaction and rebuilt with the other
read models.  The append still goes at the next version of the chord stream, so
the unique ``(stream_id, version)`` key arbitrates as for every stream: the
callback is due exactly once.

The read model is trusted only when its version is the log's: a chord that was
counting when the schema was upgraded (or whose rows were lost) is folded from
its stream once, and its rows are written again then.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from .. import lifecycle as lc
from .queries import Queries


def chord_snapshot(
    conn: sa.Connection, queries: Queries, stream: str, task_id: str
) -> lc.ChordState | None:
    """The chord's state as its read model has it, knowing of ``task_id`` only;
    None when the read model is not at the log's version (fold the stream)."""
    row = conn.execute(queries.chord_snapshot, {"stream": stream, "task": task_id}).one()
    logged = int(row.logged or 0)
    if row.version is None:
        return lc.ChordState(stream=stream, born=row.born) if logged == 0 else None
    if int(row.version) != logged:
        return None
    return lc.ChordState(
        stream=stream,
        version=logged,
        parts=frozenset([task_id]) if row.known else frozenset(),
        counted=int(row.counted),
        completed=bool(row.completed),
        born=row.born,
    )


def rewrite_chord(conn: sa.Connection, queries: Queries, state: lc.ChordState) -> None:
    """Write a chord's read model anew from its state folded from the whole stream."""
    conn.execute(queries.delete_chord_parts, {"stream": state.stream})
    if state.parts:
        conn.execute(queries.insert_chord_parts, part_rows(state.stream, state.parts))
    conn.execute(queries.upsert_chord, chord_row(state))


def chord_row(state: lc.JobState) -> dict[str, Any]:
    assert isinstance(state, lc.ChordState)
    return {
        "stream_id": state.stream,
        "version": state.version,
        "counted": state.counted,
        "completed": state.completed,
    }


def part_rows(stream: str, task_ids: Any) -> list[dict[str, Any]]:
    return [{"stream_id": stream, "task_id": task_id} for task_id in sorted(task_ids)]
