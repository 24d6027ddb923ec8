"""A Flask-SQLAlchemy app with Celery for the framework tests.

``celery -A flaskshop worker`` runs its task; the test process (or a race client,
``python -m flaskshop CONFIG``) builds the app with :func:`create_app` and makes
requests through Flask's test client.  Everything it connects to comes from the
environment: the acceptance harness's broker, options and marker directory, and
``FLASKSHOP_SCHEMA`` (the PostgreSQL schema of the broker, empty on SQLite).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from typing import Any

import sqlalchemy as sa
from celery import Celery
from flask import Flask, abort, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from celery_eventstore.contrib.flask import atomic_requests


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Order(db.Model):  # type: ignore[name-defined,misc]
    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)


def make_celery() -> Celery:
    broker = os.environ["ACCEPTANCE_BROKER_URL"]
    app = Celery("flaskshop", broker=broker, set_as_current=True)
    app.conf.broker_transport_options = json.loads(os.environ["ACCEPTANCE_TRANSPORT_OPTIONS"])
    app.conf.broker_connection_retry_on_startup = True
    return app


celery = make_celery()


def create_app() -> Flask:
    """The Flask app: ``POST /orders/<id>`` writes an order and publishes its receipt."""
    app = Flask("flaskshop")
    url = os.environ["ACCEPTANCE_BROKER_URL"].removeprefix("eventstore+")
    schema = os.environ.get("FLASKSHOP_SCHEMA")
    options: dict[str, Any] = {"poolclass": sa.pool.NullPool}
    if schema:
        options["connect_args"] = {"options": f"-c search_path={schema}"}
    else:
        options["connect_args"] = {"timeout": 30}
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = options
    # [flask]
    db.init_app(app)
    # The one line that makes every publish during a request join db.session.
    atomic_requests(app, db.session, celery)

    @app.post("/orders/<order_id>")
    def create_order(order_id: str) -> dict[str, str]:
        db.session.add(Order(id=order_id))
        db.session.flush()
        receipt.apply_async([order_id], task_id=f"job-{order_id}")
        if request.args.get("fail"):
            abort(500)  # the request ends without a commit: no order, no job
        if request.args.get("sleep"):
            time.sleep(float(request.args["sleep"]))
        db.session.commit()  # the order and its job, together
        return {"id": order_id}
    # [flask]

    return app


@celery.task(name="flaskshop.receipt", shared=False)
def receipt(order_id: str) -> None:
    with create_app().app_context():
        exists = db.session.get(Order, order_id) is not None
    line = json.dumps({"order": order_id, "exists": exists})
    with open(os.path.join(os.environ["ACCEPTANCE_MARKER_DIR"], f"ran-{order_id}"), "a") as out:
        out.write(line + "\n")


def race(config: dict[str, Any]) -> None:
    """The kill -9 client: requests that commit, fail, or sleep and commit."""
    rng = random.Random(config["seed"])
    client = create_app().test_client()
    with open(config["log"], "a", buffering=1) as log:
        log.write("ready\n")
        for i in range(config["iterations"]):
            order_id = f"{config['prefix']}-{i}"
            outcome = rng.choice(("commit", "rollback", "sleep"))
            query = {"rollback": "?fail=1", "sleep": f"?sleep={rng.uniform(0.002, 0.03)}"}
            log.write(f"requested {order_id}\n")
            status = client.post(f"/orders/{order_id}{query.get(outcome, '')}").status_code
            log.write(f"{'rolledback' if status == 500 else 'committed'} {order_id}\n")
        log.write("done\n")


if __name__ == "__main__":
    race(json.loads(sys.argv[1]))
