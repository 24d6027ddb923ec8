"""Statements prepared on the server for psycopg2, which never prepares.

PostgreSQL plans a statement each time it receives its text; for the store's
hottest statements the planning costs more than the execution (a claim's
nomination: about 0.46 ms of planning for 0.18 ms of execution, measured on a
2-core machine).  psycopg 3 prepares statements by itself after
``prepare_threshold`` runs; this does the same for psycopg2, with SQL's
``PREPARE`` and ``EXECUTE``, after five runs unless the URL says another number
(``?prepare_threshold=N``, ``none`` for never).

Each statement text the engine runs is counted per connection; on its N-th run
(the first with 0) it is prepared under a name derived from its text, and that
run and every later one on the connection is sent as ``EXECUTE name (...)``,
its parameters interpolated by psycopg2 as before, each with the cast the
statement gave it.  A statement the server will not prepare runs as it is.

A prepared statement lives on one server connection, so this cannot work through
a pooler that moves a client between server connections at each transaction
(PgBouncer's transaction pooling, at every version for SQL-level ``PREPARE``):
a connection the dialect finds reaching a pooler is told never to prepare
(:func:`never_prepare`), unless the URL asked.  A new DB-API connection starts
with nothing prepared, and an ``EXECUTE`` the server no longer knows (SQLSTATE
26000) makes the connection forget them all, so the retry prepares again.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from typing import Any

import sqlalchemy as sa

#: The per-connection map (``ConnectionRecord.info``): statement text -> its
#: run count, ``(name, EXECUTE text)`` once prepared, or None if it cannot be.
_KEY = "celery_eventstore.prepared"
#: The most statements prepared on one connection (texts with a list of
#: parameters of each length are distinct statements).
MOST_PREPARED = 256
#: psycopg2's named placeholder, with the cast the statement gives it, if any.
_PLACEHOLDER = re.compile(
    r"%\((?P<name>[^)]+)\)s(?P<cast>::[A-Za-z]+(?: PRECISION| VARYING)?(?:\(\d+\))?(?:\[\])?)?"
)
_PREPARABLE = ("SELECT", "WITH", "INSERT", "UPDATE", "DELETE")
#: invalid_sql_statement_name: ``EXECUTE`` of a name this session does not hold.
_UNKNOWN_STATEMENT = "26000"
#: duplicate_prepared_statement: ``PREPARE`` of a name this session holds.
_ALREADY_PREPARED = "42P05"


class ServerPrepared:
    """Installs the rewrite on an engine (see the module)."""

    def __init__(self, threshold: int) -> None:
        #: Runs of a statement on a connection before it is prepared (0: at once).
        self.threshold = threshold

    def install(self, engine: sa.Engine) -> None:
        sa.event.listen(engine, "connect", _forget)
        sa.event.listen(engine, "before_cursor_execute", self._rewrite, retval=True)
        sa.event.listen(engine, "handle_error", _on_error)

    def _rewrite(
        self, conn: sa.Connection, cursor: Any, statement: str, parameters: Any,
        context: Any, executemany: bool,
    ) -> tuple[str, Any]:
        # A named (server-side) cursor wraps its statement in DECLARE ... FOR,
        # which takes no EXECUTE.
        if executemany or not isinstance(parameters, dict) or getattr(cursor, "name", None):
            return statement, parameters
        known: dict[str, Any] | None = conn.connection.info.get(_KEY)
        if known is None:
            return statement, parameters
        entry = known.get(statement)
        if entry is None and statement not in known:
            if len(known) >= MOST_PREPARED:
                return statement, parameters
            entry = 0
        if isinstance(entry, int):
            if entry < self.threshold:
                known[statement] = entry + 1
                return statement, parameters
            entry = known[statement] = _prepare(conn.connection.dbapi_connection, statement)
        if entry is None:
            return statement, parameters
        return entry[1], parameters


def _prepare(dbapi_connection: Any, statement: str) -> tuple[str, str] | None:
    """Prepare ``statement`` on this connection: its name and the text that runs
    it, or None where it is not a statement to prepare or the server refused."""
    if not statement.lstrip().upper().startswith(_PREPARABLE):
        return None
    order: dict[str, str] = {}
    for match in _PLACEHOLDER.finditer(statement):
        order.setdefault(match["name"], match["cast"] or "")
    numbers = {name: n for n, name in enumerate(order, start=1)}
    body = _PLACEHOLDER.sub(
        lambda m: f"${numbers[m['name']]}{m['cast'] or ''}", statement
    ).replace("%%", "%")
    name = "ces_" + hashlib.blake2b(statement.encode(), digest_size=12).hexdigest()
    arguments = ", ".join(f"%({n})s{cast}" for n, cast in order.items())
    execute = f"EXECUTE {name} ({arguments})" if arguments else f"EXECUTE {name}"
    cursor = dbapi_connection.cursor()
    # Inside a transaction a refused PREPARE must not abort it: a savepoint
    # takes the error.  (psycopg2 outside autocommit opens one for the PREPARE.)
    guarded = not dbapi_connection.autocommit
    try:
        if guarded:
            cursor.execute("SAVEPOINT ces_prepare")
        try:
            cursor.execute(f"PREPARE {name} AS {body}")
        except Exception as error:
            if guarded:
                cursor.execute("ROLLBACK TO SAVEPOINT ces_prepare")
            # Already prepared in this session (its map was reset): the name is
            # the text's, so it is this statement.
            return (name, execute) if getattr(error, "pgcode", None) == _ALREADY_PREPARED else None
        if guarded:
            cursor.execute("RELEASE SAVEPOINT ces_prepare")
    finally:
        cursor.close()
    return name, execute


def _forget(dbapi_connection: Any, record: Any) -> None:
    """A new DB-API connection holds no prepared statement."""
    record.info[_KEY] = {}


def never_prepare(record: Any) -> None:
    """Send a new DB-API connection's statements as they are, always."""
    record.info[_KEY] = None


def _on_error(context: Any) -> None:
    if getattr(context.original_exception, "pgcode", None) != _UNKNOWN_STATEMENT:
        return
    connection = context.connection
    if connection is not None and not connection.invalidated:
        with contextlib.suppress(Exception):  # a connection on its way out
            info = connection.connection.info
            if info.get(_KEY) is not None:  # never one told not to prepare
                info[_KEY] = {}
