"""Running a statement over rows at the least Python cost."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa


def execute_rows(
    conn: sa.Connection, statement: sa.Executable, rows: Sequence[Mapping[str, Any]]
) -> sa.CursorResult[Any]:
    """``statement`` once per row of ``rows`` (never empty): one row as a single
    execution, since SQLAlchemy's executemany path costs a single row half as much
    Python again (and a RETURNING that keeps the rows' order goes row by row anyway)."""
    return conn.execute(statement, rows[0] if len(rows) == 1 else list(rows))
