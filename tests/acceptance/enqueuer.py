"""A client process for the atomic-enqueue acceptance tests (``python -m enqueuer CONFIG``).

``CONFIG`` is JSON: ``broker_url``, ``options`` (transport options), ``db_url``,
``schema`` (or null), ``prefix`` (unique per process), ``iterations``, ``seed``,
``log`` (a file path) and ``warm_up``.  Each iteration opens a connection, begins
a transaction, inserts business row ``<prefix>-<i>``, publishes
``resultproj.noop`` with task id ``job-<prefix>-<i>`` inside
``atomic(connection)``, and then -- at random -- commits, rolls back, or sleeps a
few milliseconds and commits.

It appends one line per step to ``log`` (``published ID``, ``committed ID``,
``rolledback ID``), flushed at once, so the test knows what it did even after a
SIGKILL: a ``committed`` line is written after the commit returned, a
``rolledback`` one after the rollback.
"""

from __future__ import annotations

import json
import random
import sys
import time
from typing import Any

import resultproj
import sqlalchemy as sa

from celery_eventstore import atomic

BUSINESS_TABLE = "business_rows"
#: The task each iteration publishes.
TASK = "resultproj.noop"


def business_table(schema: str | None) -> sa.Table:
    """The application's own table, in the broker's database (and schema)."""
    return sa.Table(
        BUSINESS_TABLE,
        sa.MetaData(schema=schema),
        sa.Column("id", sa.String(100), primary_key=True),
    )


def job_id(row_id: str) -> str:
    return f"job-{row_id}"


def business_engine(db_url: str) -> sa.Engine:
    """The application's engine: a plain one, as a user would create it."""
    if sa.make_url(db_url).get_backend_name() == "sqlite":
        # Six writers share one file: wait for the write lock like the store does.
        return sa.create_engine(db_url, connect_args={"timeout": 30})
    return sa.create_engine(db_url)


def main(config: dict[str, Any]) -> None:
    rng = random.Random(config["seed"])
    # The process's one app, hence Celery's current app (the one atomic() checks).
    app = resultproj.make_app(config["broker_url"], config["options"], current=True)
    engine = business_engine(config["db_url"])
    table = business_table(config["schema"])
    with open(config["log"], "a", buffering=1) as log:
        if config["warm_up"]:
            app.send_task(TASK, task_id=f"warmup-{config['prefix']}")
        log.write("ready\n")
        for i in range(config["iterations"]):
            row_id = f"{config['prefix']}-{i}"
            with engine.connect() as conn:
                conn.begin()
                conn.execute(table.insert().values(id=row_id))
                with atomic(conn):
                    app.send_task(TASK, task_id=job_id(row_id))
                log.write(f"published {row_id}\n")
                outcome = rng.choice(("commit", "rollback", "sleep"))
                if outcome == "rollback":
                    conn.rollback()
                    log.write(f"rolledback {row_id}\n")
                    continue
                if outcome == "sleep":
                    time.sleep(rng.uniform(0.002, 0.03))
                conn.commit()
                log.write(f"committed {row_id}\n")
        log.write("done\n")
    app.pool.force_close_all()
    engine.dispose()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
