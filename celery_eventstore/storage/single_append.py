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
positions; events whose projection records their log position
(:data:`POSITIONED`: publishes, dead letters) take the generic path, as does
anything the capture cannot carry in one statement (a statement of many rows,
two statements on one table).  A lost race fails on ``(stream_id, version)`` as
the generic append does, and is retried from a fresh read.
"""

from __future__ import annotations

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


class SingleAppend:
    """The one statement for a stream's events and their derived rows, built
    once per shape."""

    def __init__(self, queries: Queries, notify: Notify | None) -> None:
        self.queries = queries
        self.notify = notify
        #: Keyed by the derived statements' ids; each value holds those
        #: statements, so no id is reused while its key is kept.
        self._built: dict[tuple[Any, ...], tuple[list[Any], sa.Select[Any] | None]] = {}

    def prepare(
        self, rows: Sequence[Mapping[str, Any]], recorded: Sequence[RecordedEvent],
        states: Mapping[str, lc.JobState], wake: str | None,
    ) -> tuple[sa.Select[Any], dict[str, Any]] | None:
        """The statement and its parameters appending ``rows`` (the event rows
        of ``recorded``, one stream's, in version order), with the derived rows
        their projection makes as of ``states`` and, with ``wake`` (a channel),
        a wake-up naming their stream; None when that is not one statement.
        The statement returns the events' positions, in order."""
        if (not 0 < len(rows) <= MOST_EVENTS or (wake and self.notify is None)
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
        statement = self._statement(
            len(rows), sorted(rows[0]), [s for s, _ in derived], [sorted(p) for _, p in derived],
            wake is not None,
        )
        if statement is None:
            return None
        params: dict[str, Any] = {}
        for number, row in enumerate(rows):
            params.update({f"e{number}_{key}": value for key, value in row.items()})
        for number, (_, one) in enumerate(derived):
            params.update({f"d{number}_{key}": value for key, value in one.items()})
        if wake is not None:
            params.update(channel=wake, payload=recorded[0].stream)
        return statement, params

    def _statement(
        self, events: int, event_columns: list[str], derived: list[Any],
        columns: list[list[str]], wakes: bool,
    ) -> sa.Select[Any] | None:
        """The statement of one shape, built once (None: it cannot be built)."""
        key = (events, tuple(event_columns), tuple(id(s) for s in derived),
               tuple(map(tuple, columns)), wakes)
        built = self._built.get(key)
        if built is not None:
            return built[1]
        statement = self._build(events, event_columns, derived, columns, wakes)
        if len(self._built) < _MOST_SHAPES:
            self._built[key] = (derived, statement)
        return statement

    def _build(
        self, events: int, event_columns: list[str], derived: list[Any],
        columns: list[list[str]], wakes: bool,
    ) -> sa.Select[Any] | None:
        renamed = [
            with_prefix(statement, f"d{number}_", names)
            for number, (statement, names) in enumerate(zip(derived, columns, strict=True))
        ]
        if any(statement is None for statement in renamed):
            return None
        appended = self._appended(events, event_columns)
        ctes = [statement.cte(f"derived_{number}")  # type: ignore[union-attr]
                for number, statement in enumerate(renamed)]
        returned: list[Any] = [
            cte.c.position.label(f"position_{number}") for number, cte in enumerate(appended)
        ]
        if wakes:
            assert self.notify is not None
            returned.append(self.notify(sa.bindparam("channel"), sa.bindparam("payload"))
                            .label("woken"))
        joined: Any = appended[0]
        for cte in appended[1:]:  # one row each: a join on true is their one row
            joined = joined.join(cte, sa.true())
        return sa.select(*returned).select_from(joined).add_cte(*ctes)

    def _appended(self, events: int, columns: list[str]) -> list[sa.CTE]:
        """One CTE per event row, each inserting from the one before it: its
        row exists only once the earlier one's does, so the positions follow
        the versions as the generic append's do."""
        ev = self.queries.tables.events
        appended: list[sa.CTE] = []
        for number in range(events):
            values = [sa.bindparam(f"e{number}_{c}", type_=ev.c[c].type) for c in columns]
            source = sa.select(*values)
            if appended:
                source = source.select_from(appended[-1])
            appended.append(
                ev.insert().from_select(columns, source).returning(ev.c.position)
                .cte(f"appended_{number}")
            )
        return appended


def one_row(params: Any) -> dict[str, Any] | None:
    """The parameters of a statement executed for one row; None for many rows."""
    if isinstance(params, Mapping):
        return dict(params)
    if isinstance(params, Sequence) and len(params) == 1 and isinstance(params[0], Mapping):
        return dict(params[0])
    return None


def with_prefix(statement: Any, prefix: str, names: Sequence[str]) -> Any | None:
    """``statement`` with its named parameters prefixed.  A plain ``INSERT``
    (no values of its own: executing it with ``names`` makes them) is made
    anew with prefixed values, not cloned (a clone keeps the original's
    memoized columns, so its ``RETURNING`` would export none).  None for an
    ``INSERT`` of another kind that names no parameters."""
    if isinstance(statement, sa.Insert):
        table = statement.table
        if _same(statement, table.insert()):
            return table.insert().values(
                {name: sa.bindparam(prefix + name, type_=table.c[name].type) for name in names}
            )

    named: list[str] = []

    def replace(element: Any) -> Any:
        if isinstance(element, BindParameter) and not element.unique:
            named.append(element.key)
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


__all__: Sequence[str] = ["MOST_EVENTS", "POSITIONED", "SingleAppend"]
