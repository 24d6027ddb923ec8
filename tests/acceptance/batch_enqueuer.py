"""Producer and consumer processes for the atomic batch race
(``python -m batch_enqueuer produce|consume CONFIG``).

``produce``: ``blocks`` times, open a connection and a transaction, write a
business row, publish ``block`` tasks (ids ``job-<prefix>-<block>-<i>``) inside
``atomic(connection)``, a few of them inside a savepoint that is rolled back or
released at random, then commit or roll back at random.  It prints
``committed ID`` / ``rolledback ID`` for each task once the commit or rollback
has returned.

``consume``: claim and ack from the default queue until the file ``stop`` names
exists and three claims in a row came back empty; prints ``delivered ID`` for
each ack.
"""

from __future__ import annotations

import json
import os
import random
import sys
from typing import Any

import resultproj
from enqueuer import TASK, business_engine, business_table

from celery_eventstore import atomic
from celery_eventstore.storage import EventStore


def produce(config: dict[str, Any]) -> None:
    rng = random.Random(config["seed"])
    app = resultproj.make_app(config["broker_url"], config["options"], current=True)
    engine = business_engine(config["db_url"])
    table = business_table(config["schema"])
    for b in range(config["blocks"]):
        ids = [f"job-{config['prefix']}-{b}-{i}" for i in range(config["block"])]
        kept, dropped = [], []
        with engine.connect() as conn:
            conn.begin()
            conn.execute(table.insert().values(id=f"{config['prefix']}-{b}"))
            with atomic(conn, app=app):
                cut = rng.randrange(len(ids))
                for task_id in ids[:cut]:
                    app.send_task(TASK, task_id=task_id)
                kept += ids[:cut]
                savepoint = conn.begin_nested()
                inside = ids[cut:cut + 5]
                for task_id in inside:
                    app.send_task(TASK, task_id=task_id)
                if rng.random() < 0.5:
                    savepoint.rollback()
                    dropped += inside
                else:
                    savepoint.commit()
                    kept += inside
                for task_id in ids[cut + 5:]:
                    app.send_task(TASK, task_id=task_id)
                kept += ids[cut + 5:]
            if rng.random() < 0.4:
                conn.rollback()
                dropped += kept
                kept = []
            else:
                conn.commit()
        for task_id in kept:
            print("committed", task_id)
        for task_id in dropped:
            print("rolledback", task_id)
        sys.stdout.flush()
    app.pool.force_close_all()
    engine.dispose()


def consume(config: dict[str, Any]) -> None:
    store = EventStore(config["db_url"], **config["store_options"])
    empty = 0
    while empty < 3 or not os.path.exists(config["stop"]):
        claimed = store.claim(["celery"], 16, f"consumer-{os.getpid()}", 60)
        if not claimed:
            empty += 1
            continue
        empty = 0
        outcomes = store.ack([m.ref for m in claimed])
        assert set(outcomes.values()) == {"done"}, outcomes
        for m in claimed:
            print("delivered", m.stream)
        sys.stdout.flush()
    store.close()


if __name__ == "__main__":
    {"produce": produce, "consume": consume}[sys.argv[1]](json.loads(sys.argv[2]))
