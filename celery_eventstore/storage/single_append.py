"""A stream's events appended after its read, in one statement where the
database can take it.

A result write (``Succeeded``, ``Failed``, ``RetryScheduled``, ``Started``, a
chord's part counted) reads its stream, lets the pure model decide, and
appends an event or two.  The generic append then costs a round trip per
statement: the events, each derived row (the results row, the task-index row,
the chord's rows), the result channel's wake-up.  This sends them as one
statement of data-modifying CTEs on PostgreSQL: the event rows (their
positions ``RETURNING``), each statement :func:`.projection.project` makes for
them -- captured rather than executed, its parameters renamed apart -- and the
wake-up.

Nothing is decided here.  The events' recorded time is the transaction's, known
since the read, so the derived rows need nothing from the event rows but their
positions.  A write decided with no read (a worker's result, on the state its
claim left) does not know that time: its rows hold :data:`STATEMENT_TIME` where
the time goes, and the statement takes it from the database's clock -- never
earlier than the stream's last recorded time -- and returns it.  Such a write
goes after the events appended since that state when every one of them is
result-neutral (:data:`~celery_eventstore.lifecycle.RESULT_NEUTRAL_EVENTS`: the
worker's own early ack, a lease renewal), as its decision and derived rows are
then the same; after anything else it goes where the state left off, and loses
on the version key.  Events whose projection records their log position
(:data:`POSITIONED`: publishes, dead letters) take the generic path, as does
anything the capture cannot carry in one statement (a statement of many rows,
two statements on one table).  A lost race fails on ``(stream_id, version)`` as
the generic append does, and is retried from a fresh read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import BindParameter

from .. import lifecycle as lc
from .projection import captured
from .queries import Queries
from .records import RecordedEvent

#: Events whose projection records their log position.
POSITIONED = (lc.Published, lc.DeadLettered, lc.Quarantined)

#: The most events of one statement (a revoke discards each waiting message).
MOST_EVENTS = 8

#: Statements built per shape (which derived statements, with a wake-up or
#: not); a handful in practice, bounded in case a projection makes new ones.
_MOST_SHAPES = 64

#: Makes the wake-up: (channel, payload) -> SQL expression.
Notify = Callable[[sa.ColumnElement[str], sa.ColumnElement[str]], Any]


class StatementTime(float):
    """Stands in, in rows decided before their statement runs, for the time the
    statement will take from the database's clock.  Not a number, so a value
    computed from it is not one either, and :meth:`SingleAppend.prepare`
    refuses it rather than write it."""

    def __new__(cls) -> StatementTime:
        return super().__new__(cls, math.nan)


#: The one stand-in: a row's value is the statement's time when it *is* this.
STATEMENT_TIME = StatementTime()


class SingleAppend:
    """The one statement for a stream's events and their derived rows, built
    once per shape."""

    def __init__(
        self, queries: Queries, notify: Notify | None, clock: sa.ColumnElement[Any] | None
    ) -> None:
        self.queries = queries
        self.notify = notify
        #: The database's clock, for a statement that takes its own time.
        self.clock = clock
        #: Keyed by the derived statements' ids; each value holds those
        #: statements, so no id is reused while its key is kept.
        self._built: dict[tuple[Any, ...], tuple[list[Any], sa.Select[Any] | None]] = {}

    def prepare(
        self, rows: Sequence[Mapping[str, Any]], recorded: Sequence[RecordedEvent],
        states: Mapping[str, lc.JobState], wake: str | None,
        *, decided_at: lc.JobState | None = None, now: float | None = None,
    ) -> tuple[sa.Select[Any], dict[str, Any]] | None:
        """The statement and its parameters appending ``rows`` (the event rows
        of ``recorded``, one stream's, in version order), with the derived rows
        their projection makes as of ``states`` and, with ``wake`` (a channel),
        a wake-up naming their stream; None when that is not one statement.
        The statement returns the events' positions, in order.

        With ``decided_at`` (the state the rows were decided on, unread), the
        time was not known: wherever a value is :data:`STATEMENT_TIME` the
        statement writes the database's clock (``now`` instead, where the
        store's clock is injected), or the stream's last recorded time if that
        is later; the versions move past the result-neutral events appended
        since that state, if all since are.  It returns that time and the
        versions' shift after the positions."""
        timed = decided_at is not None
        if (not 0 < len(rows) <= MOST_EVENTS or (wake and self.notify is None)
                or (timed and self.clock is None)
                or any(isinstance(r.event, POSITIONED) for r in recorded)):
            return None
        derived: list[tuple[Any, dict[str, Any]]] = []
        for statement, given in captured(self.queries, recorded, states):
            one = one_row(given)
            if one is None:
                return None
            derived.append((statement, one))
        tables = {id(getattr(statement, "table", None)) for statement, _ in derived}
        if len(tables) != len(derived) or id(None) in tables:
            return None  # two changes to one table in one statement, or not a change
        if not all(_plain(row) for row in [*rows, *(one for _, one in derived)]):
            return None  # a value made from the stand-in time, not the time
        if any(_columns(row) != _columns(rows[0]) for row in rows):
            return None
        statement = self._statement(
            len(rows), _columns(rows[0]), [s for s, _ in derived],
            [_columns(p) for _, p in derived], wake is not None, timed,
        )
        if statement is None:
            return None
        params: dict[str, Any] = {}
        for number, row in enumerate(rows):
            params.update({f"e{number}_{key}": value for key, value in row.items()
                           if value is not STATEMENT_TIME})
        for number, (_, one) in enumerate(derived):
            params.update({f"d{number}_{key}": value for key, value in one.items()
                           if value is not STATEMENT_TIME})
        if wake is not None:
            params.update(channel=wake, payload=recorded[0].stream)
        if decided_at is not None:
            params.update(now=now, not_before=decided_at.recorded_until,
                          tail_stream=decided_at.stream, decided_version=decided_at.version)
        return statement, params

    def _statement(
        self, events: int, event_columns: Columns, derived: list[Any],
        columns: list[Columns], wakes: bool, timed: bool,
    ) -> sa.Select[Any] | None:
        """The statement of one shape, built once (None: it cannot be built)."""
        key = (events, event_columns, tuple(id(s) for s in derived), tuple(columns),
               wakes, timed)
        built = self._built.get(key)
        if built is not None:
            return built[1]
        statement = self._build(events, event_columns, derived, columns, wakes, timed)
        if len(self._built) < _MOST_SHAPES:
            self._built[key] = (derived, statement)
        return statement

    def _build(
        self, events: int, event_columns: Columns, derived: list[Any],
        columns: list[Columns], wakes: bool, timed: bool,
    ) -> sa.Select[Any] | None:
        time = shift = None
        ctes: list[Any] = []
        if timed:
            tail = self._tail()
            time = sa.select(tail.c.now).scalar_subquery()
            shift = sa.select(tail.c.shift).scalar_subquery()
            ctes.append(tail)
        renamed = [
            with_prefix(statement, f"d{number}_", names, timed=at, time=time)
            for number, (statement, (names, at)) in enumerate(zip(derived, columns, strict=True))
        ]
        if any(statement is None for statement in renamed):
            return None
        appended = self._appended(events, event_columns, time, shift)
        ctes += [statement.cte(f"derived_{number}")  # type: ignore[union-attr]
                 for number, statement in enumerate(renamed)]
        returned: list[Any] = [
            cte.c.position.label(f"position_{number}") for number, cte in enumerate(appended)
        ]
        if time is not None and shift is not None:
            returned += [time.label("recorded_at"), shift.label("shift")]
        if wakes:
            assert self.notify is not None
            returned.append(self.notify(sa.bindparam("channel"), sa.bindparam("payload"))
                            .label("woken"))
        joined: Any = appended[0]
        for cte in appended[1:]:  # one row each: a join on true is their one row
            joined = joined.join(cte, sa.true())
        return sa.select(*returned).select_from(joined).add_cte(*ctes)

    def _tail(self) -> sa.CTE:
        """The stream's events since the state a write was decided on, read in
        the statement (once: a CTE) as one row: ``now``, the time to record at
        -- the clock, never before the stream's last event -- and ``shift``,
        how far the versions move: past those events if every one is
        result-neutral, else not at all (the write then loses on the key)."""
        assert self.clock is not None
        ev = self.queries.tables.events
        at = ev.c.recorded_at.type
        not_before = sa.bindparam("not_before", type_=at)
        # The names are written into the statement, quoted as they are (class
        # names): a list bound as a parameter would be expanded into the text
        # again at every execution.
        names = sorted(
            name for name, cls in lc.EVENT_TYPES.items() if cls in lc.RESULT_NEUTRAL_EVENTS
        )
        assert all(name.isidentifier() for name in names), names
        neutral = [sa.literal_column(f"'{name}'", ev.c.type.type) for name in names]
        return (
            sa.select(
                sa.func.greatest(
                    sa.func.coalesce(sa.bindparam("now", type_=at), self.clock),
                    sa.func.coalesce(sa.func.max(ev.c.recorded_at), not_before),
                    not_before,
                ).label("now"),
                sa.case((sa.func.bool_and(ev.c.type.in_(neutral)), sa.func.count()), else_=0)
                .label("shift"),
            )
            .where(
                ev.c.stream_id == sa.bindparam("tail_stream", type_=ev.c.stream_id.type),
                ev.c.version > sa.bindparam("decided_version", type_=ev.c.version.type),
            )
            .cte("statement_time")
        )

    def _appended(
        self, events: int, columns: Columns, time: Any = None, shift: Any = None
    ) -> list[sa.CTE]:
        """One CTE per event row, each inserting from the one before it: its
        row exists only once the earlier one's does, so the positions follow
        the versions as the generic append's do."""
        ev = self.queries.tables.events
        names, timed = columns
        appended: list[sa.CTE] = []
        for number in range(events):
            values: list[Any] = []
            for c in names:
                value: Any = sa.bindparam(f"e{number}_{c}", type_=ev.c[c].type)
                if c in timed:
                    value = time
                elif c == "version" and shift is not None:
                    value = value + shift
                values.append(value)
            source = sa.select(*values)
            if appended:
                source = source.select_from(appended[-1])
            appended.append(
                ev.insert().from_select(list(names), source).returning(ev.c.position)
                .cte(f"appended_{number}")
            )
        return appended


#: A row's columns, sorted, and those of them that take the statement's time.
Columns = tuple[tuple[str, ...], frozenset[str]]


def _columns(row: Mapping[str, Any]) -> Columns:
    return tuple(sorted(row)), frozenset(k for k, v in row.items() if v is STATEMENT_TIME)


def _plain(row: Mapping[str, Any]) -> bool:
    """Whether the row holds no value computed from the stand-in time: no NaN
    that is not the stand-in itself."""
    return not any(
        isinstance(v, float) and v is not STATEMENT_TIME and math.isnan(v) for v in row.values()
    )


def one_row(params: Any) -> dict[str, Any] | None:
    """The parameters of a statement executed for one row; None for many rows."""
    if isinstance(params, Mapping):
        return dict(params)
    if isinstance(params, Sequence) and len(params) == 1 and isinstance(params[0], Mapping):
        return dict(params[0])
    return None


def with_prefix(
    statement: Any, prefix: str, names: Sequence[str], *,
    timed: frozenset[str] = frozenset(), time: Any = None,
) -> Any | None:
    """``statement`` with its named parameters prefixed, and those ``timed``
    replaced by ``time`` (an SQL expression).  A plain ``INSERT`` (no values of
    its own: executing it with ``names`` makes them) is made anew with prefixed
    values, not cloned (a clone keeps the original's memoized columns, so its
    ``RETURNING`` would export none).  None for an ``INSERT`` of another kind
    that names no parameters."""
    if timed and time is None:
        return None
    if isinstance(statement, sa.Insert):
        table = statement.table
        if _same(statement, table.insert()):
            return table.insert().values({
                name: time if name in timed
                else sa.bindparam(prefix + name, type_=table.c[name].type)
                for name in names
            })

    named: list[str] = []

    def replace(element: Any) -> Any:
        if isinstance(element, BindParameter) and not element.unique:
            named.append(element.key)
            if element.key in timed:
                return time
            return sa.bindparam(prefix + element.key, value=element.value, type_=element.type,
                                expanding=element.expanding)
        return None

    renamed = visitors.replacement_traverse(statement, {}, replace)  # type: ignore[call-overload]
    if isinstance(statement, sa.Insert) and not named:
        return None  # values it would take from its parameters: not one we know
    return renamed


def _same(a: Any, b: Any) -> bool:
    """Whether two statements are the same SQL."""
    return bool(a._generate_cache_key() == b._generate_cache_key())  # noqa: SLF001


__all__: Sequence[str] = [
    "MOST_EVENTS", "POSITIONED", "STATEMENT_TIME", "SingleAppend", "StatementTime",
]
