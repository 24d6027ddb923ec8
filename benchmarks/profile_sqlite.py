"""cProfile of the Python side of one publish and one delivery on SQLite.

SQLite costs little per statement, so what the profile shows is mostly Python:
the transport, the store, SQLAlchemy, kombu and Celery.  ``--url`` profiles
another database instead (a SQLAlchemy URL; on PostgreSQL a schema of its own,
dropped afterwards), where the driver's ``execute`` -- the round trips -- comes
first, and the same Python follows.  ``publish`` profiles
``task.delay()`` (Celery -> kombu -> ``Channel._put`` -> ``EventStore.publish``);
``drain`` profiles a kombu consumer's blocking loop (claim with the pending acks
-> kombu message -> ack), prefetch 8; ``result`` adds the result backend's
``mark_as_done`` per message to the drain.

    python benchmarks/profile_sqlite.py publish 2000
    python benchmarks/profile_sqlite.py drain 2000 --sort cumulative --top 40
    python benchmarks/profile_sqlite.py drain 2000 --only celery_eventstore
    python benchmarks/profile_sqlite.py result 2000 --url postgresql://postgres@127.0.0.1/test

The function-call count in the profile's header does not depend on machine load:
compare it between two versions when the machine is busy.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from celery import Celery
from e2e_rig import scratch_schema
from kombu import Consumer, Queue


class _Request:
    """What a worker hands ``mark_as_done`` about the message it ran."""

    def __init__(self, message: Any) -> None:
        self.id = message.headers["id"]
        self.task = message.headers["task"]
        self.headers = message.headers
        self.delivery_info = message.delivery_info
        self.eventstore_claim = message.headers.get("eventstore_claim")
        # The state the claim left travels in the properties, as to a pool process.
        self.properties = message.properties
        self.children: list[Any] = []

    def __getattr__(self, name: str) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["publish", "drain", "result"])
    parser.add_argument("count", type=int, nargs="?", default=2000)
    parser.add_argument("--sort", default="tottime", help="pstats sort key")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--only", default="", help="restrict the listing to this text")
    parser.add_argument("--url", help="a SQLAlchemy URL to profile instead of a new SQLite file")
    args = parser.parse_args()

    options: dict[str, Any] = {}
    drop: Callable[[], None] = lambda: None  # noqa: E731
    if args.url is None:
        url = f"eventstore+sqlite:///{Path(tempfile.mkdtemp()) / 'profile.db'}"
    else:
        url = f"eventstore+{args.url}"
        if sa.make_url(args.url).get_backend_name() == "postgresql":
            _, options["schema"], drop = scratch_schema("profile", args.url)
    app = Celery("profile", broker=url, backend=url)
    app.conf.task_default_queue = "celery"
    app.conf.broker_transport_options = options
    app.conf.result_backend_transport_options = options
    try:
        run_profile(app, args)
    finally:
        app.close()
        drop()


def run_profile(app: Celery, args: argparse.Namespace) -> None:
    @app.task(name="profile.noop")
    def noop(x: float = 0.0) -> None:
        return None

    def publish(n: int) -> None:
        for i in range(n):
            noop.delay(float(i))

    with app.connection() as conn:
        channel = conn.channel()
        channel.basic_qos(0, 8, False)
        received = [0]

        def on_message(body: Any, message: Any) -> None:
            received[0] += 1
            if args.phase == "result":
                app.backend.mark_as_done(message.headers["id"], None, request=_Request(message))
            message.ack()

        Consumer(channel, [Queue("celery")], callbacks=[on_message], accept=["json"]).consume()

        def drain(n: int) -> None:
            received[0] = 0
            while received[0] < n:
                conn.drain_events(timeout=5)
            channel.qos.flush_acks()

        publish(20)  # the schema, the queue and the caches, untimed
        drain(20)
        if args.phase != "publish":
            publish(args.count)
        profile = cProfile.Profile()
        work = publish if args.phase == "publish" else drain
        cpu, wall = time.process_time(), time.perf_counter()
        profile.enable()
        work(args.count)
        profile.disable()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        if args.phase == "publish":
            drain(args.count)
    print(f"{args.phase} x {args.count}: {wall:.2f} s wall, "
          f"{1e6 * cpu / args.count:.0f} us CPU per message (under the profiler)")
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out).sort_stats(args.sort)
    stats.print_stats(*([args.only] if args.only else []), args.top)
    print(out.getvalue())


if __name__ == "__main__":
    main()
