"""The Django project's client process: ``python -m shopclient SCENARIO [JSON]``.

Scenarios publish ``shop.receipt`` from Django code the way an application would,
with atomic enqueue automatic (``SHOP_AUTOMATIC=1``) or explicit
(``with atomic(connection)``), and print what they did as one JSON object.

``race`` is the kill -9 client: each iteration writes an order and publishes its
job inside ``transaction.atomic()``, then commits, rolls back, or sleeps and
commits, appending ``published ID`` / ``committed ID`` / ``rolledback ID`` lines
(flushed at once) to the log file its config names.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import unittest
from collections.abc import Callable
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")
django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from django.test import TestCase  # noqa: E402
from shop.models import Order  # noqa: E402
from shop.tasks import receipt  # noqa: E402

from celery_eventstore import atomic  # noqa: E402

AUTOMATIC = os.environ.get("SHOP_AUTOMATIC") == "1"


class Rollback(Exception):
    """Raised inside transaction.atomic() to roll it back."""


def job_id(order_id: str) -> str:
    return f"job-{order_id}"


def publish(order_id: str) -> str:
    """Publish the order's receipt as the application's mode has it."""
    if AUTOMATIC:
        return str(receipt.apply_async([order_id], task_id=job_id(order_id)).id)
    return publish_explicitly(order_id)


def publish_explicitly(order_id: str) -> str:
    # [explicit]
    with atomic(connection):  # django.db.connection: joins its transaction
        result = receipt.apply_async([order_id], task_id=job_id(order_id))
    # [explicit]
    return str(result.id)


def rolled_back(block: Callable[[], None]) -> None:
    try:
        with transaction.atomic():
            block()
            raise Rollback()
    except Rollback:
        pass


def outcomes(plain: bool = True) -> dict[str, Any]:
    """``plain``: also publish without atomic() inside transaction.atomic() (on
    SQLite only joined publishes can write while Django's transaction holds the
    write lock: the store's own transaction would wait for it)."""
    driver = connection.Database.__name__.split(".")[0]
    out: dict[str, Any] = {"vendor": connection.vendor, "module": driver}

    # [commit]
    with transaction.atomic():
        Order.objects.create(id="commit")
        publish("commit")  # joins the block: committed with the order
    # [commit]

    def rollback() -> None:
        Order.objects.create(id="rollback")
        publish("rollback")

    rolled_back(rollback)

    # [savepoint]
    with transaction.atomic():  # the outer block commits...
        Order.objects.create(id="outer")
        publish("outer")
        try:
            with transaction.atomic():  # ...its savepoint rolls back
                Order.objects.create(id="inner")
                publish("inner")
                raise Rollback()
        except Rollback:
            pass
    # [savepoint]

    try:  # outside any atomic block
        publish("outside")
    except Exception as exc:  # explicit mode: nothing to join
        out["outside"] = f"{type(exc).__name__}: {exc}"
        receipt.apply_async(["outside"], task_id=job_id("outside"))

    # [on-commit]
    with transaction.atomic():  # Celery's own habit: publish after the commit
        Order.objects.create(id="on-commit")
        receipt.apply_async_on_commit(["on-commit"], task_id=job_id("on-commit"))
    # [on-commit]

    def on_commit_rolled_back() -> None:
        Order.objects.create(id="on-commit-rollback")
        receipt.apply_async_on_commit(
            ["on-commit-rollback"], task_id=job_id("on-commit-rollback")
        )

    rolled_back(on_commit_rolled_back)

    def plain_delay() -> None:  # no atomic(): joined only in automatic mode
        Order.objects.create(id="plain")
        receipt.apply_async(["plain"], task_id=job_id("plain"))

    if plain:
        rolled_back(plain_delay)
    return out


def checks() -> dict[str, Any]:
    """What atomic() refuses, and what the automatic mode leaves alone."""
    from django.db import connections

    from celery_eventstore.enqueue import AtomicEnqueueError

    out: dict[str, Any] = {}

    def refused(name: str, block: Callable[[], None]) -> None:
        try:
            block()
        except AtomicEnqueueError as exc:
            out[name] = str(exc)

    def other_database() -> None:
        with transaction.atomic(using="other"), atomic(connections["other"]):
            receipt.apply_async(["other"], task_id=job_id("other"))

    def marked_for_rollback() -> None:
        with transaction.atomic():
            transaction.set_rollback(True)
            with atomic(connection):
                receipt.apply_async(["marked"], task_id=job_id("marked"))

    refused("other", other_database)
    refused("marked", marked_for_rollback)
    if AUTOMATIC:  # an atomic block on another database is not the broker's transaction
        try:
            with transaction.atomic(using="other"):
                receipt.apply_async(["unrelated"], task_id=job_id("unrelated"))
                raise Rollback()
        except Rollback:
            pass
    return out


def migrate() -> dict[str, Any]:
    call_command("migrate", run_syncdb=True, verbosity=0)
    return {}


class InATestCase(TestCase):
    """What a Django TestCase sees: each test runs inside a transaction that is
    rolled back at its end."""

    def test_publish(self) -> None:
        Order.objects.create(id="testcase")
        receipt.apply_async(["testcase"], task_id=job_id("testcase"))
        self.assertTrue(Order.objects.filter(id="testcase").exists())

    def test_publish_on_commit(self) -> None:
        with self.captureOnCommitCallbacks(execute=True) as callbacks:
            Order.objects.create(id="testcase-on-commit")
            receipt.apply_async_on_commit(
                ["testcase-on-commit"], task_id=job_id("testcase-on-commit")
            )
        self.assertEqual(len(callbacks), 1)


def testcase() -> dict[str, Any]:
    suite = unittest.defaultTestLoader.loadTestsFromTestCase(InATestCase)
    result = unittest.TextTestRunner(stream=sys.stderr, verbosity=2).run(suite)
    return {"ok": result.wasSuccessful(), "errors": [str(e[1]) for e in result.errors]}


def race(config: dict[str, Any]) -> dict[str, Any]:
    rng = random.Random(config["seed"])
    with open(config["log"], "a", buffering=1) as log:
        log.write("ready\n")
        for i in range(config["iterations"]):
            order_id = f"{config['prefix']}-{i}"
            outcome = rng.choice(("commit", "rollback", "sleep"))
            try:
                with transaction.atomic():
                    Order.objects.create(id=order_id)
                    publish(order_id)
                    log.write(f"published {order_id}\n")
                    if outcome == "rollback":
                        raise Rollback()
                    if outcome == "sleep":
                        time.sleep(rng.uniform(0.002, 0.03))
            except Rollback:
                log.write(f"rolledback {order_id}\n")
                continue
            log.write(f"committed {order_id}\n")
        log.write("done\n")
    return {}


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "migrate": migrate,
    "outcomes": outcomes,
    "checks": checks,
    "testcase": testcase,
    "race": race,
}

if __name__ == "__main__":
    args = [json.loads(a) for a in sys.argv[2:]]
    print(json.dumps(SCENARIOS[sys.argv[1]](*args)))
