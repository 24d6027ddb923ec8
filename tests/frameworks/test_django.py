"""Atomic enqueue through Django, with real workers, on SQLite and on PostgreSQL
through both of Django's drivers (psycopg2, psycopg 3).

The ``shop`` project publishes from Django code; a ``celery -A shop worker`` runs
the jobs and records, for each, whether its order existed when it ran.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from djangoshop import DATABASES, RaceClient, Shop
from harness import Broker, open_broker, queue_drained, reaper_for, wait_for


@pytest.fixture(params=DATABASES, ids=lambda p: "-".join(filter(None, p)))
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    dialect, _ = request.param
    reaper = reaper_for(request, dialect)
    if dialect == "sqlite":
        url = f"sqlite:///{tmp_path / 'shop.db'}"
    else:
        url = request.getfixturevalue("postgresql_url")
    yield from open_broker(request, tmp_path, reaper, url)


@pytest.fixture
def shop(request: pytest.FixtureRequest, broker: Broker, monkeypatch: Any) -> Shop:
    s = Shop(broker, request.node.callspec.params["broker"][1], monkeypatch)
    s.run("migrate")
    return s


#: Orders whose jobs must run once, and whether each order exists when it runs.
COMMITTED = {"commit": True, "outer": True, "outside": False, "on-commit": True}
#: Orders whose jobs must leave no event at all.
DISCARDED = ["rollback", "inner", "on-commit-rollback"]


def _check_outcomes(shop: Shop, answer: dict[str, Any], runs_plain: bool) -> None:
    events = shop.broker.events
    expected = dict(COMMITTED)
    if runs_plain:
        expected["plain"] = False  # published at once, its order rolled back
    for order in expected:
        wait_for(lambda o=order: shop.runs(o), 30, f"the job of order {order!r} to run",
                 show=lambda o=order: shop.broker.types(f"job-{o}"))
    # Every job settled (acked), then exactly one run each.
    stats = shop.broker.stats
    # Read once per check: the row can go between two reads.
    wait_for(lambda: queue_drained(stats()), 10, "an empty queue")
    for order, exists in expected.items():
        assert shop.runs(order) == [{"order": order, "exists": exists}], order
    gone = DISCARDED + ([] if runs_plain else ["plain"])
    for order in gone:
        assert events(f"job-{order}") == [], order
        assert shop.runs(order) == []


@pytest.mark.slow
@pytest.mark.parametrize("automatic", [True, False], ids=["automatic", "explicit"])
def test_publishes_join_djangos_transaction(
    shop: Shop, start_worker: Any, automatic: bool
) -> None:
    shop.set_automatic(automatic)
    start_worker(app="shop")
    # On SQLite, a publish that does not join Django's transaction waits for the
    # write lock that transaction holds: only the automatic mode can do "plain".
    plain = automatic or shop.broker.dialect != "sqlite"
    answer = shop.run("outcomes", plain)
    assert answer["module"] == (shop.driver or "sqlite3"), answer
    if automatic:
        assert "outside" not in answer  # outside atomic(): published on its own
    else:
        assert "AtomicEnqueueError" in answer["outside"], answer
    _check_outcomes(shop, answer, runs_plain=plain and not automatic)


# -- enqueue iff commit through Django, with client processes killed at random -----

CLIENTS = 5
ITERATIONS = 30
KILLS = 3


@pytest.mark.slow
def test_enqueue_iff_commit_through_django_with_clients_killed_at_random(shop: Shop) -> None:
    """Automatic mode: each client writes an order and publishes its job inside
    ``transaction.atomic()``, then commits or rolls back; some are SIGKILLed
    mid-way.  Committed orders and published jobs are the same set."""
    shop.set_automatic(True)
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    clients = [RaceClient(shop, n, seed + n, ITERATIONS) for n in range(CLIENTS)]
    try:
        kills = 0
        deadline = time.monotonic() + 90
        while kills < KILLS and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.05, 0.4))
            working = [c for c in clients if c.working()]
            if not working:
                if all(c.proc.poll() is not None for c in clients):
                    break
                continue
            rng.choice(working).kill()
            kills += 1
            clients.append(RaceClient(shop, len(clients), seed + len(clients), ITERATIONS // 2))
        wait_for(lambda: all(c.proc.poll() is not None for c in clients), 120,
                 "the client processes to finish", interval=0.2)
    finally:
        for c in clients:
            if c.proc.poll() is None:
                c.kill()

    failed = {c.prefix: c.err() for c in clients if not c.killed and c.proc.returncode}
    assert not failed, f"client processes failed (seed {seed}): {failed}"
    assert kills >= 1, "no client was killed during its run"
    orders = shop.orders()
    committed = _logged(clients, "committed")
    rolled_back = _logged(clients, "rolledback")
    assert committed and rolled_back, seed
    assert committed <= orders and not (rolled_back & orders), seed
    published = _published(shop)
    assert set(published) == {f"job-{o}" for o in orders}, {
        "seed": seed,
        "jobs without an order": sorted(set(published) - {f"job-{o}" for o in orders}),
        "orders without a job": sorted({f"job-{o}" for o in orders} - set(published)),
    }
    assert set(published.values()) == {1}, seed


def _logged(clients: list[RaceClient], what: str) -> set[str]:
    return {
        line.split(" ", 1)[1] for c in clients for line in c.lines() if line.startswith(what + " ")
    }


def _published(shop: Shop) -> Counter[str]:
    """Published events per job stream."""
    out: Counter[str] = Counter()
    after = 0
    while page := shop.broker.store.read_all(after=after, limit=1000):
        out.update(r.stream for r in page if r.type == "Published" and r.stream.startswith("job-"))
        after = page[-1].position
    return out


@pytest.mark.parametrize("automatic", [True, False], ids=["automatic", "explicit"])
def test_what_a_django_testcase_sees(shop: Shop, automatic: bool) -> None:
    """TestCase wraps each test in a transaction it rolls back.  Automatic mode
    publishes into that transaction, so the jobs vanish with it; without it a
    publish commits on its own and outlives the test."""
    if shop.broker.dialect == "sqlite" and not automatic:
        pytest.skip("on SQLite a publish outside the test's transaction waits for its lock")
    shop.set_automatic(automatic)
    answer = shop.run("testcase")
    assert answer["ok"], answer
    for order in ("testcase", "testcase-on-commit"):
        published = [r.type for r in shop.broker.events(f"job-{order}")]
        assert published == ([] if automatic else ["Published"]), order
    assert shop.orders() == set()


@pytest.mark.parametrize("automatic", [True, False], ids=["automatic", "explicit"])
def test_what_atomic_refuses_through_django(
    shop: Shop, automatic: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOP_OTHER_DATABASE", str(tmp_path / "other.db"))
    shop.set_automatic(automatic)
    answer = shop.run("checks")
    assert "can only join a transaction on the same database" in answer["other"], answer
    assert "marked for rollback" in answer["marked"], answer
    for order in ("other", "marked"):
        assert shop.broker.events(f"job-{order}") == []
    if automatic:  # published on its own: the other database's rollback is not ours
        assert [r.type for r in shop.broker.events("job-unrelated")] == ["Published"]
