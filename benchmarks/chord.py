"""Chord part cost: what counting the first and the last part of a big chord costs.

For each dialect -- SQLite in a temporary file, PostgreSQL through ``psycopg2`` and
``psycopg`` (3) in a scratch schema -- it counts every part of one chord of
``--size`` parts (default 10,000) through ``EventStore.execute(CountChordPart)``,
one transaction per part as the result backend does, and prints the mean time
and the statements per part over the first and the last ``--window`` parts.

Usage: ``python benchmarks/chord.py [--size N] [--window N] [--dialects LIST]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from celery_eventstore import lifecycle as lc  # noqa: E402
from celery_eventstore.storage import EventStore  # noqa: E402

DEFAULT_POSTGRESQL_URL = os.environ.get(
    "CELERY_EVENTSTORE_TEST_POSTGRESQL_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@contextlib.contextmanager
def target(dialect: str, base_url: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """A store URL and options on a scratch database, removed afterwards."""
    if dialect == "sqlite":
        workdir = tempfile.mkdtemp(prefix="chord-bench-")
        try:
            yield f"sqlite:///{workdir}/chord.db", {}
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return
    url = sa.make_url(base_url).set(drivername=f"postgresql+{dialect}")
    schema = f"chord_bench_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.schema.CreateSchema(schema))
    try:
        yield url.render_as_string(hide_password=False), {"schema": schema}
    finally:
        with engine.begin() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=True))
        engine.dispose()


def count_parts(url: str, options: dict[str, Any], size: int) -> list[tuple[float, int]]:
    """Seconds and statements of counting each part of one chord, in order."""
    store = EventStore(url, **options)
    store.migrate()
    statements = [0]

    def sent(*args: Any) -> None:
        statements[0] += 1

    sa.event.listen(store.engine, "before_cursor_execute", sent)
    costs = []
    chord = lc.chord_stream(uuid.uuid4().hex)
    try:
        for part in range(size):
            statements[0] = 0
            started = time.perf_counter()
            store.execute(chord, lc.CountChordPart(f"part-{part}", "SUCCESS", size))
            costs.append((time.perf_counter() - started, statements[0]))
        state = store.load(chord)
        assert isinstance(state, lc.ChordState) and state.completed, "the chord did not complete"
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", sent)
        store.close()
    return costs


def summary(costs: list[tuple[float, int]], window: int) -> dict[str, float]:
    first, last = costs[:window], costs[-window:]
    return {
        "first ms": statistics.mean(s for s, _ in first) * 1000,
        "last ms": statistics.mean(s for s, _ in last) * 1000,
        "first SQL": statistics.mean(n for _, n in first),
        "last SQL": statistics.mean(n for _, n in last),
        "total s": sum(s for s, _ in costs),
    }


COLUMNS = ["first ms", "last ms", "first SQL", "last SQL", "total s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10_000, help="parts of the chord")
    parser.add_argument("--window", type=int, default=100, help="parts averaged at each end")
    parser.add_argument("--dialects", default="sqlite,psycopg2,psycopg")
    parser.add_argument("--postgresql-url", default=DEFAULT_POSTGRESQL_URL)
    args = parser.parse_args()
    window = min(args.window, args.size)
    table: dict[str, dict[str, Any]] = {}
    for dialect in args.dialects.split(","):
        print(f"counting {args.size} parts on {dialect} ...", file=sys.stderr, flush=True)
        try:
            with target(dialect, args.postgresql_url) as (url, options):
                table[dialect] = summary(count_parts(url, options, args.size), window)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            table[dialect] = {"error": str(exc)[:200]}
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\nchord of {args.size} parts, means over the first and last {window} ({stamp})")
    print(f"{'dialect':<12}" + "".join(f"{c:>12}" for c in COLUMNS))
    for name, row in table.items():
        if "error" in row:
            print(f"{name:<12} error: {row['error']}")
            continue
        print(f"{name:<12}" + "".join(f"{row[c]:>12.2f}" for c in COLUMNS))
    return 1 if any("error" in row for row in table.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
