"""Names the store keeps, checked before any SQL is sent.

Two kinds of name reach the database:

* **Names that come with the work**: task ids (stream ids, ``group:``/``chord:``
  prefix included), delivery ids, queue names, exchange names, routing keys,
  consumer names.  Each must fit its column and hold no NUL character (PostgreSQL
  cannot store one; SQLite would keep it, and an over-long name, silently).
  Commands -- anything that would write the name -- refuse a bad one with
  :class:`~celery_eventstore.exceptions.InvalidName`, naming the field, the length
  and the limit; queries answer that nothing has that name, which is true.
* **The store's own namespace**, ``table_prefix`` and ``schema``: checked when the
  store is created (:func:`check_namespace`), so that every name derived from them
  -- tables, indexes, constraints, sequences -- is a plain identifier that
  PostgreSQL keeps whole (63 bytes at most).  NOTIFY channel names fit for any
  namespace (:class:`~.notifiers.Channels` shortens a long one to a digest).

The limits are read from the live tables (:mod:`.schema`), so they follow the schema.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ..exceptions import ConfigurationError, InvalidName
from .schema import CANVAS_LINKS, Tables, make_tables

#: PostgreSQL keeps this many bytes of an identifier (NAMEDATALEN - 1) and
#: silently truncates the rest; NOTIFY channel names are identifiers too.
MAX_IDENTIFIER = 63
#: What ``table_prefix`` and ``schema`` may hold: ASCII letters, digits and
#: underscores, not starting with a digit, so no name needs quoting to be
#: read (case aside) and every character is one byte.
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
#: How much of a bad name an error message shows.
_PREVIEW = 40


@dataclass(frozen=True)
class Field:
    """One kind of name and the longest the store can keep."""

    label: str
    limit: int
    note: str = ""

    def problem(self, value: str) -> str | None:
        """Why ``value`` cannot be stored, or None when it can."""
        if len(value) > self.limit:
            return (
                f"{self.label} {_preview(value)} is {len(value)} characters long; "
                f"the limit is {self.limit}{self.note}"
            )
        if "\x00" in value:
            return (
                f"{self.label} {_preview(value)} contains a NUL character, "
                "which PostgreSQL cannot store"
            )
        return None

    def check(self, *values: str) -> None:
        """Raise :class:`InvalidName` for the first value that cannot be stored."""
        for value in values:
            if isinstance(value, str) and (reason := self.problem(value)):
                raise InvalidName(reason)

    def fits(self, value: str) -> bool:
        """Whether ``value`` can be stored (so it may exist)."""
        return not isinstance(value, str) or self.problem(value) is None

    def storable(self, values: Iterable[str]) -> list[str]:
        """The values that may exist; the rest match nothing."""
        return [v for v in values if self.fits(v)]


class Names:
    """The fields of one store's tables, each with its limit."""

    def __init__(self, tables: Tables) -> None:
        t = tables
        self.stream = Field(
            "task id",
            _shortest(t.events.c.stream_id, t.messages.c.stream_id,
                      t.dead_letters.c.stream_id, t.results.c.stream_id),
            " (a group:/chord: stream counts its prefix)",
        )
        self.delivery = Field(
            "delivery id", _shortest(t.messages.c.delivery_id, t.dead_letters.c.delivery_id)
        )
        self.queue = Field(
            "queue name",
            _shortest(t.messages.c.queue, t.dead_letters.c.queue, t.queues.c.name,
                      t.bindings.c.queue, t.transient_messages.c.queue),
        )
        self.exchange = Field("exchange name", _shortest(t.bindings.c.exchange))
        self.routing_key = Field("routing key", _shortest(t.bindings.c.routing_key))
        self.pattern = Field("binding pattern", _shortest(t.bindings.c.pattern))
        self.exchange_type = Field("exchange type", _shortest(t.bindings.c.exchange_type))
        self.consumer = Field("consumer name", _shortest(t.messages.c.consumer))


def _shortest(*columns: sa.Column[Any]) -> int:
    """The length of the narrowest of ``columns`` (all ``String(n)``)."""
    lengths: list[int] = [
        c.type.length for c in columns if isinstance(c.type, sa.String) and c.type.length
    ]
    return min(lengths)


def _preview(value: str) -> str:
    """The name as a message quotes it: its start only, never a whole payload."""
    if len(value) <= _PREVIEW:
        return repr(value)
    return repr(value[:_PREVIEW]) + "..."


# -- the store's namespace ------------------------------------------------------------


def derived_names(prefix: str) -> list[str]:
    """Every name the schema derives from ``prefix`` in PostgreSQL: tables, indexes,
    named constraints, and the primary keys (``<table>_pkey``) and sequences of
    autoincrement columns (``<table>_<column>_seq``) PostgreSQL names itself."""
    names: list[str] = []
    for table in make_tables(prefix).metadata.tables.values():
        names.append(table.name)
        names.append(f"{table.name}_pkey")
        names.extend(str(index.name) for index in table.indexes)
        names.extend(str(c.name) for c in table.constraints if isinstance(c.name, str))
        serial = table.autoincrement_column
        if serial is not None:
            names.append(f"{table.name}_{serial.name}_seq")
    # The expression indexes, made by DDL of their own (see CANVAS_LINK_INDEXES).
    names.extend(f"{prefix}events_{key}" for key in CANVAS_LINKS)
    return names


#: The longest suffix the schema adds to ``table_prefix``.
LONGEST_SUFFIX = max(len(name) for name in derived_names(""))
#: The longest ``table_prefix`` whose derived names all fit.
MAX_PREFIX = MAX_IDENTIFIER - LONGEST_SUFFIX


def check_namespace(prefix: str, schema: str | None) -> None:
    """Raise :class:`ConfigurationError` unless ``table_prefix`` and ``schema`` are
    plain identifiers short enough for every name derived from them."""
    rule = "ASCII letters, digits and underscores, not starting with a digit"
    if not isinstance(prefix, str) or (prefix and not IDENTIFIER.fullmatch(prefix)):
        raise ConfigurationError(f"table_prefix {prefix!r} may hold only {rule}")
    if len(prefix) > MAX_PREFIX:
        raise ConfigurationError(
            f"table_prefix {prefix!r} is {len(prefix)} characters long; the limit is "
            f"{MAX_PREFIX}, so that its longest table, index or sequence name "
            f"(prefix + {LONGEST_SUFFIX} characters) fits PostgreSQL's "
            f"{MAX_IDENTIFIER}-byte identifiers"
        )
    if schema is None or schema == "":  # no schema: the search path's, as before
        return
    if not isinstance(schema, str) or not IDENTIFIER.fullmatch(schema):
        raise ConfigurationError(f"schema {schema!r} may hold only {rule}")
    if len(schema) > MAX_IDENTIFIER:
        raise ConfigurationError(
            f"schema {schema!r} is {len(schema)} characters long; the limit is "
            f"{MAX_IDENTIFIER} (PostgreSQL's identifiers)"
        )
