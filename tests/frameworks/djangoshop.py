"""The Django tests' view of the ``shop`` project on a broker's database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from harness import Broker

HERE = Path(__file__).resolve().parent

#: (broker dialect, Django's PostgreSQL driver)
DATABASES = [("sqlite", None), ("postgresql", "psycopg2"), ("postgresql", "psycopg")]


def django_database(broker: Broker) -> dict[str, Any]:
    """Django's ``DATABASES["default"]`` for the broker's database (and schema)."""
    if broker.dialect == "sqlite":
        path = sa.make_url(broker.db_url).database
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": path,
                "OPTIONS": {"timeout": 30}}
    url = sa.make_url(broker.db_url)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": url.database,
        "USER": url.username or "",
        "PASSWORD": url.password or "",
        "HOST": url.host or "",
        "PORT": str(url.port or ""),
        "OPTIONS": {"options": f"-c search_path={broker.schema}"},
    }


class Shop:
    """The Django project ``shop`` configured for one broker; ``automatic`` says
    whether ``celery_eventstore.contrib.django`` is installed."""

    def __init__(self, broker: Broker, driver: str | None, monkeypatch: Any) -> None:
        self.broker = broker
        self.driver = driver
        self.monkeypatch = monkeypatch
        self.automatic = False
        env = {
            "SHOP_DATABASE": json.dumps(django_database(broker)),
            "SHOP_DJANGO_DRIVER": driver or "",
            "DJANGO_SETTINGS_MODULE": "shop.settings",
            "ACCEPTANCE_BROKER_URL": broker.url,
            "ACCEPTANCE_TRANSPORT_OPTIONS": json.dumps(broker.transport_options()),
            "ACCEPTANCE_MARKER_DIR": str(broker.markers),
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        }
        for name, value in env.items():  # the harness's workers inherit them too
            monkeypatch.setenv(name, value)
        self.set_automatic(False)

    def set_automatic(self, on: bool) -> None:
        self.automatic = on
        self.monkeypatch.setenv("SHOP_AUTOMATIC", "1" if on else "0")

    def command(self, scenario: str, *args: Any) -> list[str]:
        return [sys.executable, "-m", "shopclient", scenario, *(json.dumps(a) for a in args)]

    def run(self, scenario: str, *args: Any, timeout: float = 120) -> dict[str, Any]:
        """Run a client scenario to its end; its JSON answer."""
        done = subprocess.run(
            self.command(scenario, *args), cwd=HERE, capture_output=True, text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, done.stderr
        answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        answer["stderr"] = done.stderr
        return answer

    def orders(self) -> set[str]:
        """The committed orders (read through the store's engine)."""
        table = sa.table("shop_order", sa.column("id"), schema=self.broker.schema)
        with self.broker.store.engine.connect() as conn:
            return set(conn.execute(sa.select(table.c.id)).scalars())

    def runs(self, order_id: str) -> list[dict[str, Any]]:
        return self.broker.runs(f"ran-{order_id}")


class RaceClient:
    """``python -m shopclient race``: a client process the race test may SIGKILL."""

    def __init__(self, shop: Shop, n: int, seed: int, iterations: int) -> None:
        self.prefix = f"c{n}"
        tmp = shop.broker.tmp_path
        self.log_path = tmp / f"client-{self.prefix}.log"
        self.err_path = tmp / f"client-{self.prefix}.err"
        config = {"prefix": self.prefix, "iterations": iterations, "seed": seed,
                  "log": str(self.log_path)}
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                shop.command("race", config), cwd=HERE, stdin=subprocess.DEVNULL,
                stdout=err, stderr=subprocess.STDOUT,
            )
        self.killed = False

    def lines(self) -> list[str]:
        return self.log_path.read_text().splitlines() if self.log_path.exists() else []

    def err(self) -> str:
        return self.err_path.read_text()

    def working(self) -> bool:
        """Started its loop, not finished it, still alive."""
        lines = self.lines()
        return self.proc.poll() is None and "ready" in lines and "done" not in lines

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.killed = True
