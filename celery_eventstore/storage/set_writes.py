"""A round's appends and their derived rows as one statement, where the database
can take it.

A consumer's round (its acks, its claims) appends events to many streams and
changes a row of the ``messages`` table for each: the generic append sends the
event rows, then each statement :func:`.projection.project` makes -- a batch of
updates, a delete -- a round trip apiece.  On PostgreSQL this sends them as one
statement of data-modifying CTEs: the event rows from one array per column
(``unnest``), each derived statement of one parameter set with its parameters
renamed apart, and each batch of keyed updates from arrays as well.  The
statement's shape does not depend on how many rows, so one is built per kind
of round.

Nothing is decided here, and nothing needs the events' positions (the caller
does not read them back; an event whose projection records its position takes
the generic path).  The derived statements touch distinct rows (the projection
folds all of a delivery's changes into one), which is what lets them share one
snapshot.  A lost race fails on ``(stream_id, version)`` as the generic append
does, and the whole statement with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from .. import lifecycle as lc
from .dialects import Dialect
from .projection import captured
from .queries import Queries
from .records import RecordedEvent
from .single_append import one_row, with_prefix

#: Statements built per shape; a handful in practice, bounded in case.
_MOST_SHAPES = 64


class SetWrites:
    """Builds, once per shape, the one statement of a round's writes."""

    def __init__(self, queries: Queries, dialect: Dialect) -> None:
        self.queries = queries
        self.dialect = dialect
        #: Keyed by the derived statements' ids and columns; each value holds
        #: those statements, so no id is reused while its key is kept.
        self._built: dict[tuple[Any, ...], tuple[list[Any], sa.Select[Any] | None]] = {}

    def prepare(
        self, rows: Sequence[Mapping[str, Any]], recorded: Sequence[RecordedEvent],
        states: Mapping[str, lc.JobState],
    ) -> tuple[sa.Select[Any], dict[str, Any]] | None:
        """The statement and parameters writing ``rows`` (the event rows of
        ``recorded``) and what their projection makes of them as of ``states``,
        or None when that is not one statement here."""
        if not rows:
            return None
        parts: list[tuple[Any, str, tuple[str, ...], Any]] = []  # statement, kind, columns, rows
        for statement, given in captured(self.queries, recorded, states):
            one = one_row(given)
            if one is not None:
                parts.append((statement, "one", tuple(sorted(one)), one))
            elif self._keyed_update(statement, given):
                parts.append((statement, "keyed", tuple(sorted(given[0])), given))
            else:
                return None
        event_columns = tuple(sorted(rows[0]))
        statement = self._statement(event_columns, parts)
        if statement is None:
            return None
        params = _columns("e_", event_columns, rows)
        for number, (_, kind, columns, given) in enumerate(parts):
            if kind == "one":
                params.update({f"d{number}_{key}": value for key, value in given.items()})
            else:
                params.update(_columns(f"d{number}_", columns, given))
        return statement, params

    def _keyed_update(self, statement: Any, given: Sequence[Mapping[str, Any]]) -> bool:
        """Whether ``statement`` over ``given`` is a batch of ``messages`` updates
        by delivery (:meth:`.Queries.update_messages`)."""
        if not isinstance(statement, sa.Update) or not given:
            return False
        columns = tuple(sorted(k for k in given[0] if k != "b_delivery_id"))
        return statement is self.queries.update_messages(columns)

    def _statement(
        self, event_columns: tuple[str, ...], parts: list[tuple[Any, str, tuple[str, ...], Any]],
    ) -> sa.Select[Any] | None:
        key = (event_columns, tuple((id(s), kind, columns) for s, kind, columns, _ in parts))
        built = self._built.get(key)
        if built is not None:
            return built[1]
        statement = self._build(event_columns, parts)
        if len(self._built) < _MOST_SHAPES:
            self._built[key] = ([s for s, _, _, _ in parts], statement)
        return statement

    def _build(
        self, event_columns: tuple[str, ...], parts: list[tuple[Any, str, tuple[str, ...], Any]],
    ) -> sa.Select[Any] | None:
        ev = self.queries.tables.events
        events = self.dialect.rows_of([ev.c[c] for c in event_columns], "e_")
        if events is None:
            return None
        ctes = [ev.insert().from_select(event_columns, sa.select(*events.c)).cte("appended")]
        for number, (statement, kind, columns, _) in enumerate(parts):
            prefix = f"d{number}_"
            if kind == "one":
                written = with_prefix(statement, prefix, columns)
            else:
                written = self._update_from_rows(statement, columns, prefix)
            if written is None:
                return None
            ctes.append(written.cte(f"derived_{number}"))
        return sa.select(sa.literal(1)).add_cte(*ctes)

    def _update_from_rows(
        self, statement: sa.Update, columns: tuple[str, ...], prefix: str
    ) -> sa.Update | None:
        """The keyed updates of ``statement`` as one ``UPDATE ... FROM`` the rows."""
        msgs = self.queries.tables.messages
        keyed = [c for c in columns if c != "b_delivery_id"]
        source = self.dialect.rows_of(
            [sa.Column("b_delivery_id", msgs.c.delivery_id.type), *(msgs.c[c] for c in keyed)],
            prefix,
        )
        if source is None:
            return None
        return (
            msgs.update()
            .where(msgs.c.delivery_id == source.c.b_delivery_id)
            .values({c: source.c[c] for c in keyed if c != "delivery_id"})
        )


def _columns(
    prefix: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]
) -> dict[str, list[Any]]:
    """Rows as one list per column, named ``prefix`` + the column."""
    return {prefix + c: [row[c] for row in rows] for c in columns}


__all__: Sequence[str] = ["SetWrites"]
