"""The schema's versions, frozen, and the runner that applies them.

**A released version is never edited.**  Module ``vNNNN_<what>.py`` holds the DDL
that version N runs on a database at version N-1, with its own table definitions
and column types: the live tables in ``schema.py`` describe only the latest schema,
so deriving a version from them would silently change what that version creates.
A change to the schema is a new module:

1. change the live tables in ``schema.py`` and bump ``SCHEMA_VERSION``;
2. write ``vNNNN_<what>.py`` whose ``statements(prefix, schema)`` returns what
   takes N-1 to N: ``CreateTable``/``CreateIndex`` of tables defined in the module,
   or ``sa.DDL("ALTER TABLE %(fullname)s ADD COLUMN ...").against(table)`` for a
   table defined there by name only; ``.execute_if(dialect=...)`` keeps a
   statement to one database (storage settings only PostgreSQL has);
3. append its ``statements`` to :data:`VERSIONS`.

``tests/storage/test_migrations.py`` fails until migrating from nothing gives
exactly the tables of ``schema.py``.

A database records the versions it has applied in ``<prefix>schema_version``.
:class:`Migrator` applies the missing ones in order, in the caller's transaction,
under the dialect's migration lock, and renders the very same statements as SQL
for a DBA (``celery-eventstore migrate --sql``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import sqlalchemy as sa

from . import (
    partitioned_log,
    v0001_log_and_queue,
    v0002_routing,
    v0003_results,
    v0004_tasks,
    v0005_claims_at_scale,
    v0006_chords,
    v0007_birth_day,
)

if TYPE_CHECKING:
    from ..dialects import Dialect

#: What one version runs, for a table prefix and a schema (None: the default one).
Statements = Callable[[str, str | None], list[sa.ClauseElement]]

#: Every released version in order: version N is ``VERSIONS[N - 1]``.
VERSIONS: tuple[Statements, ...] = (
    v0001_log_and_queue.statements,
    v0002_routing.statements,
    v0003_results.statements,
    v0004_tasks.statements,
    v0005_claims_at_scale.statements,
    v0006_chords.statements,
    v0007_birth_day.statements,
)


class Migrator:
    """Reads, applies and renders the versions of one prefix's tables."""

    def __init__(
        self,
        dialect: Dialect,
        prefix: str = "eventstore_",
        schema: str | None = None,
        *,
        versions: Sequence[Statements] = VERSIONS,
        partitioned: bool = False,
    ) -> None:
        self.dialect = dialect
        #: Create the log partitioned (PostgreSQL), when creating it from nothing.
        self.partitioned = partitioned
        self.prefix = prefix
        self.schema = schema
        self.versions = tuple(versions)
        # Queried and written only: version 1 creates it.
        self.book = sa.table(
            f"{prefix}schema_version",
            sa.column("version", sa.Integer),
            sa.column("applied_at", sa.Float),
            schema=schema,
        )

    @property
    def latest(self) -> int:
        return len(self.versions)

    def current(self, conn: sa.Connection) -> int:
        """The last version applied to the connection's database (0 before any)."""
        if not sa.inspect(conn).has_table(self.book.name, schema=self.schema):
            return 0
        return int(conn.execute(sa.select(sa.func.max(self.book.c.version))).scalar() or 0)

    def pending(self, from_version: int, to_version: int | None = None) -> list[int]:
        """The versions that take ``from_version`` to ``to_version`` (default: the latest)."""
        last = self.latest if to_version is None else min(to_version, self.latest)
        return list(range(from_version + 1, last + 1))

    def statements(
        self, dialect: sa.Dialect, from_version: int, to_version: int | None = None
    ) -> list[str]:
        """The SQL :meth:`apply` runs from ``from_version``, in ``dialect``: each
        version's statements, then the insert that records it."""
        return [
            _render(statement, dialect)
            for version in self.pending(from_version, to_version)
            for statement in self._version(version, from_version)
            if _applies(statement, dialect)
        ]

    def _version(self, version: int, from_version: int) -> list[sa.ClauseElement]:
        """What one version runs and its record; a partitioned log replaces the
        empty one where it is created (only when creating the schema)."""
        out = [*self.versions[version - 1](self.prefix, self.schema), self._record(version)]
        if self.partitioned and from_version == 0 and version == partitioned_log.AFTER_VERSION:
            out += partitioned_log.statements(self.prefix, self.schema)
        return out

    def script(
        self, dialect: sa.Dialect, from_version: int, to_version: int | None = None
    ) -> str:
        """:meth:`statements` as one script (empty when there is nothing to do)."""
        statements = self.statements(dialect, from_version, to_version)
        return ";\n\n".join(statements) + ";\n" if statements else ""

    def apply(self, conn: sa.Connection, to_version: int | None = None) -> list[int]:
        """Bring the database up to ``to_version`` (default: the latest) in the
        connection's transaction; returns the versions applied."""
        # Read the version under the lock, so concurrent runs apply each version once.
        # The key never changes: processes of different releases serialise on it.
        self.dialect.lock_migrations(conn, self.prefix + (self.schema or ""))
        current = self.current(conn)
        # The rendered text itself, so `migrate --sql` shows exactly what ran.
        for sql in self.statements(conn.dialect, current, to_version):
            conn.exec_driver_sql(sql)
        return self.pending(current, to_version)

    def _record(self, version: int) -> sa.ClauseElement:
        # The database's clock, not ours: a script applied by hand records when it ran.
        now = sa.extract("epoch", sa.func.current_timestamp())
        return sa.insert(self.book).values(version=version, applied_at=now)


def _applies(statement: sa.ClauseElement, dialect: sa.Dialect) -> bool:
    """False for a statement kept to other databases by ``execute_if(dialect=...)``."""
    condition = getattr(statement, "_ddl_if", None)
    return condition is None or condition.dialect in (None, dialect.name)


def _render(statement: sa.ClauseElement, dialect: sa.Dialect) -> str:
    compiled = statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
    return str(compiled).strip()
