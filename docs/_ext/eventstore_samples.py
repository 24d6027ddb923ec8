"""Sample outputs that cannot go stale: the docs build produces them.

When a build starts, this extension runs the demo (``python -m
celery_eventstore.demo --keep docs-demo``: a real worker on a SQLite file) in a
temporary directory, then adds a few more messages to that database without a
worker -- two waiting in a ``reports`` queue (one claimed by a consumer named
``worker-a``), a task scheduled an hour ahead, and two dead letters in a
``receipts`` queue.  Two directives put what the build saw in the pages:

``.. eventstore-demo::``
    the demo's own output;

``.. eventstore-cli::``
    runs each line of its content as a ``celery-eventstore`` command line against
    that database, from the temporary directory (so the URL reads
    ``sqlite:///docs-demo/jobs.db``), and shows the prompt, the command and its
    output.  ``{name}`` in a line is an id from the data above: ``add``,
    ``receipt``, ``flaky``, ``countdown`` (the demo's tasks), ``scheduled``,
    ``dead_task``, ``dead``, ``dead2`` (dead-letter delivery ids), ``before_claim``
    (a log position).  A line starting with ``celery -A`` runs as a subprocess with
    the demo app pointed at the database.  Options: ``:strip-times:`` drops the
    time column of timelines, ``:max-lines: N`` cuts each output after N lines.

Commands run in the order the pages are read, and may change the database (``dead
retry``, ``revoke``).  Every page using a directive is read again on every build.
The demo prints absolute paths: the build's temporary directory is shown as
``/tmp``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

DEMO_DIR = "docs-demo"
URL = f"sqlite:///{DEMO_DIR}/jobs.db"
PROMPT = "$ "


class Samples:
    """The database the samples are made from, built once per build."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="eventstore-docs-")
        self.root = Path(self._tmp.name)
        self.ids: dict[str, str] = {}
        self.demo_output = ""

    def build(self) -> None:
        demo = subprocess.run(
            [sys.executable, "-m", "celery_eventstore.demo", "--keep", DEMO_DIR],
            cwd=self.root, capture_output=True, text=True, timeout=300, check=False,
        )
        if demo.returncode != 0:
            raise RuntimeError(f"the demo failed:\n{demo.stdout}\n{demo.stderr}")
        self.demo_output = self.shown(demo.stdout)
        found = dict(re.findall(r"^== (\S+)[^\n]*task (\S+)$", demo.stdout, re.M))
        self.ids.update(add=found["add(2,"], receipt=found["send_receipt(1)"],
                        flaky=found["flaky(succeed_on=3)"], countdown=found["add(40,"])
        self._more_messages()

    def _more_messages(self) -> None:
        from celery_eventstore import lifecycle as lc
        from celery_eventstore.demo import add, app, send_receipt
        from celery_eventstore.storage import EventStore

        url = f"sqlite:///{self.root / DEMO_DIR / 'jobs.db'}"
        app.conf.broker_url = app.conf.result_backend = f"eventstore+{url}"
        store = EventStore(url)
        try:
            self.ids["scheduled"] = add.apply_async((1, 1), countdown=3600).id
            add.apply_async((2, 2), queue="reports")
            add.apply_async((3, 3), queue="reports")
            self.ids["before_claim"] = str(store.last_position())
            store.claim(["reports"], 1, "worker-a:1234:0a1b2c3d", 300)
            for key, order in (("dead", 7), ("dead2", 8)):
                task_id = send_receipt.apply_async((order,), queue="receipts").id
                (claimed,) = store.claim(["receipts"], 1, "worker-b:4242:1f2e3d4c", 0.05)
                store.execute(task_id, lc.Start(worker="celery@worker-b", claim=claimed.claim))
                time.sleep(0.1)  # the lease runs out: the next claim finds it so
                store.claim(["receipts"], 1, "worker-b:4242:1f2e3d4c", 60, max_claims=1)
                self.ids[key] = claimed.delivery
                self.ids.setdefault("dead_task", task_id)
        finally:
            store.close()
            app.pool.force_close_all()

    def shown(self, text: str) -> str:
        """Output as a reader would see it: the temporary directory as /tmp."""
        return text.replace(str(self.root), "/tmp").rstrip()

    def run(self, line: str) -> str:
        """One command line, as ``$ command`` followed by what it printed."""
        command = line.format(**self.ids)
        if command.startswith("celery -A"):
            env = {**os.environ, "CELERY_EVENTSTORE_DEMO_URL": URL}
            # The interpreter of the build, whether or not its scripts are on PATH.
            argv = [sys.executable, "-m", *shlex.split(command)]
            done = subprocess.run(argv, cwd=self.root, env=env,
                                  capture_output=True, text=True, timeout=120, check=False)
            output = done.stdout + done.stderr
            command = f"CELERY_EVENTSTORE_DEMO_URL={URL} {command}"
        else:
            output = self._in_process(shlex.split(command))
            command = f"celery-eventstore {command}"
        return f"{PROMPT}{command}\n{self.shown(output)}"

    def _in_process(self, args: list[str]) -> str:
        from click.testing import CliRunner

        from celery_eventstore.cli import eventstore

        here = os.getcwd()
        os.chdir(self.root)  # relative sqlite:/// URLs, as in the pages
        try:
            result = CliRunner().invoke(eventstore, args, prog_name="celery-eventstore")
        finally:
            os.chdir(here)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise RuntimeError(f"`{shlex.join(args)}` raised {result.exception!r}")
        return result.output

    def close(self) -> None:
        self._tmp.cleanup()


_samples: Samples | None = None


def _built() -> Samples:
    if _samples is None:
        raise RuntimeError("the sample database was not built")
    return _samples


class DemoOutput(SphinxDirective):
    """The demo's own output, as this build's run printed it."""

    def run(self) -> list[nodes.Node]:
        self.env.note_dependency(__file__)
        _pages(self.env).add(self.env.docname)
        text = _built().demo_output
        return [nodes.literal_block(text, text, language="text")]


_TIME = re.compile(r"^\d\d:\d\d:\d\d\.\d\d\d  ", re.M)


class CliOutput(SphinxDirective):
    """Each content line run as a ``celery-eventstore`` command line."""

    has_content = True
    option_spec = {"strip-times": directives.flag, "max-lines": directives.positive_int}

    def run(self) -> list[nodes.Node]:
        self.env.note_dependency(__file__)
        _pages(self.env).add(self.env.docname)
        blocks = []
        for line in (c for c in self.content if c.strip()):
            text = _built().run(line.strip())
            if "strip-times" in self.options:
                text = _TIME.sub("", text)
            limit = self.options.get("max-lines")
            if limit is not None and text.count("\n") > limit:
                text = "\n".join(text.splitlines()[: limit + 1] + ["   ..."])
            blocks.append(text)
        text = "\n".join(blocks)
        return [nodes.literal_block(text, text, language="text")]


def _pages(env: Any) -> set[str]:
    if not hasattr(env, "eventstore_sample_pages"):
        env.eventstore_sample_pages = set()
    pages: set[str] = env.eventstore_sample_pages
    return pages


def _start(app: Sphinx) -> None:
    global _samples
    _samples = Samples()
    _samples.build()


def _finish(app: Sphinx, exception: BaseException | None) -> None:
    if _samples is not None:
        _samples.close()


def _always_outdated(app: Sphinx, env: Any, added: set[str], changed: set[str],
                     removed: set[str]) -> list[str]:
    # A fresh database every build: the pages showing it are read again.
    return sorted(_pages(env) - removed)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("eventstore-demo", DemoOutput)
    app.add_directive("eventstore-cli", CliOutput)
    app.connect("builder-inited", _start)
    app.connect("build-finished", _finish)
    app.connect("env-get-outdated", _always_outdated)
    return {"version": "1", "parallel_read_safe": False, "parallel_write_safe": True}
