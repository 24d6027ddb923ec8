"""Celery's own integration suite on the event store, with Redis as the reference.

Celery's sdist ships ``t/integration``: tests that start a session worker (prefork,
through ``celery.contrib.testing``) on the broker and result backend named by the
``TEST_BROKER`` and ``TEST_BACKEND`` environment variables.  This script:

1. downloads the sdist of the *installed* Celery with pip into a cache directory
   and extracts ``t/`` alone (the installed Celery is the one under test; Celery's
   code is never committed here);
2. runs the chosen modules twice, each run a ``pytest`` subprocess with a per-test
   ``--timeout``: on Redis (``redis://127.0.0.1:6379/7`` by default, flushed first)
   and on ``eventstore+postgresql://...`` in a fresh schema, dropped afterwards;
3. writes a Markdown report: per test the outcome on each, the tests that pass on
   Redis but not on the event store (the work to do), totals and timings.

Some tests use Redis as a side channel (tasks push to a list the test reads); the
plugin half of this file points them at a Redis database of their own (8 by
default) instead of database 0, on both runs.

Usage::

    python scripts/celery_integration.py                     # every module, both runs
    python scripts/celery_integration.py --modules test_inspect -k revoked
    python scripts/celery_integration.py --only eventstore --report out.md

Needs PostgreSQL (``--postgresql-url``, default ``$CELERY_EVENTSTORE_TEST_POSTGRESQL_URL``
or ``postgresql+psycopg2://postgres@127.0.0.1:5432/test``) and Redis.  ``tox -e celery-suite``
installs what the suite's modules need (pytest-timeout, redis, pydantic,
cryptography; not django: with it, test_worker's Django tests leave the test
process flagged as a worker, and every later ``result.get()`` in it fails).
The exit status is 1 when a test passes on Redis and not on ours.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
PLUGIN = Path(__file__).stem

#: Every module of t/integration except those that need a service other than the
#: broker and the result backend (Azure Blob storage, memcached).
DEFAULT_MODULES = (
    "test_tasks",
    "test_canvas",
    "test_group_chains",
    "test_inspect",
    "test_worker",
    "test_beat",
    "test_loader",
    "test_security",
    "test_serialization",
    "test_events_state_memory_leak",
    "test_mem_leak_in_exception_handling",
    "test_request_backend_down",
    "test_database_backend",
    "test_logfile_format",
    "test_upgrade",
    # Redis-only: they skip on ours, which the report lists with its reason.
    "test_redis_backend",
    "test_backend_leak_in_fixture_teardown",
    "test_connection_recovery",
)

#: Celery's own pytest settings that its tests rely on (its pyproject also points
#: testpaths at t/unit, so it is not used as is).
PYTEST_INI = """\
[pytest]
python_classes = test_*
xfail_strict = true
markers =
    flaky: Celery's rerun marker (inert: no reruns, so each outcome is one attempt)
    timeout: pytest-timeout's marker
"""

#: Set in the pytest subprocess: where its outcomes go, and the side-channel database.
OUTCOMES_ENV = "CELERY_SUITE_OUTCOMES"
SIDE_DB_ENV = "CELERY_SUITE_SIDE_REDIS_DB"

DEFAULT_POSTGRESQL = os.environ.get(
    "CELERY_EVENTSTORE_TEST_POSTGRESQL_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)


# -- the plugin half: loaded into each pytest run with ``-p celery_integration`` ----


def pytest_load_initial_conftests(early_config: Any, parser: Any, args: Any) -> None:
    """Before Celery's conftest imports it: the side channel goes to its own database."""
    db = os.environ.get(SIDE_DB_ENV)
    if db is None:
        return
    import redis
    import t.integration.tasks as tasks

    def get_redis_connection() -> Any:
        host = os.environ.get("REDIS_HOST", "localhost")
        port = int(os.environ.get("REDIS_PORT", 6379))
        # socket_timeout=None: the tests block on reads longer than the default.
        return redis.StrictRedis(host=host, port=port, db=int(db), socket_timeout=None)

    tasks.get_redis_connection = get_redis_connection


def pytest_runtest_logreport(report: Any) -> None:
    path = os.environ.get(OUTCOMES_ENV)
    if path is None:
        return
    if report.when != "call" and report.passed:
        return  # setup and teardown only matter when they fail or skip
    outcome = report.outcome
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    elif report.when != "call" and report.failed:
        outcome = "error"
    message = ""
    if report.skipped and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2])
    elif report.failed:
        message = _summary(report)
    record = {"test": report.nodeid, "when": report.when, "outcome": outcome,
              "message": message, "duration": report.duration}
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")


def _summary(report: Any) -> str:
    """The line that says why: the exception line of the traceback, or the last one."""
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message).splitlines()[0][:300]
    lines = [line for line in str(report.longrepr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E ")]
    return (errors or lines or [""])[-1][:300]


# -- the script half --------------------------------------------------------------


@dataclass
class Run:
    name: str
    broker: str
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    returncode: int | None = None


def celery_version() -> str:
    return importlib.metadata.version("celery")


def fetch_suite(version: str, cache: Path) -> Path:
    """``<cache>/celery-<version>``, holding the sdist's ``t/`` and a pytest.ini."""
    root = cache / f"celery-{version}"
    done = root / ".complete"
    if done.exists():
        return root
    if root.exists():
        shutil.rmtree(root)  # a half-finished extraction from an earlier run
    root.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", "--no-input", f"celery=={version}", "-d", tmp,
        ]
        print(f"downloading the celery {version} sdist", flush=True)
        subprocess.run(command, check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL)
        sdist = next(Path(tmp).glob("celery-*.tar.gz"))
        with tarfile.open(sdist) as archive:
            # Only t/: extracting the sdist's celery/ beside it would shadow the
            # installed Celery, which is the one under test.
            members = [
                m for m in archive.getmembers()
                if (m.isfile() or m.isdir()) and m.name.split("/", 1)[-1].startswith("t/")
            ]
            for member in members:
                member.name = member.name.split("/", 1)[1]
            archive.extractall(root, members=members, filter="data")
    (root / "pytest.ini").write_text(PYTEST_INI)
    done.write_text(version)
    return root


def celery_fixtures() -> list[str]:
    """Celery's pytest fixtures, unless pytest-celery already loads them."""
    plugins = importlib.metadata.entry_points(group="pytest11")
    if any(e.name == "celery" for e in plugins):
        return []
    return ["-p", "celery.contrib.pytest"]


def flush_redis(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


def redis_db_url(url: str, db: int) -> str:
    parts = urlsplit(url)
    return parts._replace(path=f"/{db}").geturl()


def create_schema(admin_url: str) -> tuple[str, str]:
    """A fresh schema; returns it and the broker URL whose search_path is only it.

    The schema goes in the URL, not in transport options, because some tests start
    ``celery worker`` subprocesses that are given the broker URL alone.
    """
    import sqlalchemy as sa

    schema = f"celery_suite_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(admin_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.schema.CreateSchema(schema))
    finally:
        engine.dispose()
    url = sa.make_url(admin_url).update_query_dict({"options": f"-csearch_path={schema}"})
    return schema, "eventstore+" + url.render_as_string(hide_password=False)


def drop_schema(admin_url: str, schema: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(admin_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=True))
    finally:
        engine.dispose()


def run_suite(run: Run, suite: Path, args: argparse.Namespace, side_db: int) -> None:
    outcomes = Path(tempfile.mkstemp(prefix=f"celery-suite-{run.name}-", suffix=".jsonl")[1])
    redis_parts = urlsplit(args.redis_url)
    env = {
        **os.environ,
        "TEST_BROKER": run.broker,
        "TEST_BACKEND": run.broker,
        "REDIS_HOST": redis_parts.hostname or "127.0.0.1",
        "REDIS_PORT": str(redis_parts.port or 6379),
        SIDE_DB_ENV: str(side_db),
        OUTCOMES_ENV: str(outcomes),
        "PYTHONPATH": os.pathsep.join(
            [str(suite), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    command = [
        sys.executable, "-m", "pytest", "-c", "pytest.ini", "--rootdir", ".",
        "-p", PLUGIN, "-p", "no:cacheprovider", "-q", "-rN", *celery_fixtures(),
        f"--timeout={args.timeout}",
        *[f"t/integration/{m}.py" for m in args.modules],
        *(["-k", args.k] if args.k else []),
        *(["-x"] if args.exitfirst else []),
    ]
    log = args.log_dir / f"{run.name}.log"
    print(f"[{run.name}] {run.broker}  (log: {log})", flush=True)
    started = time.monotonic()
    with open(log, "w") as out:
        # Its own session, so whatever it leaves running can be ended with it.
        proc = subprocess.Popen(command, cwd=suite, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            run.returncode = proc.wait(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            print(f"[{run.name}] still running after {args.run_timeout}s: stopped",
                  flush=True)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    run.seconds = time.monotonic() - started
    reports: dict[str, list[dict[str, Any]]] = {}
    for line in outcomes.read_text().splitlines():
        record = json.loads(line)
        reports.setdefault(record["test"], []).append(record)
    run.outcomes = {test: _final(records) for test, records in reports.items()}
    outcomes.unlink()
    counts = totals(run)
    print(f"[{run.name}] {format_counts(counts)} in {run.seconds:.0f}s", flush=True)


def _final(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One outcome per test from its setup, call and teardown reports: a failed call
    is a failure; otherwise a failed setup or teardown is an error; otherwise the
    call's outcome, or the setup's skip when there was no call."""
    by_outcome = {r["outcome"]: r for r in records}
    chosen = (
        next((r for r in records if r["when"] == "call" and r["outcome"] == "failed"), None)
        or by_outcome.get("error")
        or next((r for r in records if r["when"] == "call"), None)
        or records[0]
    )
    return {**chosen, "duration": sum(r["duration"] for r in records)}


OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed", "not run")


def totals(run: Run) -> dict[str, int]:
    counts = dict.fromkeys(OUTCOMES, 0)
    for record in run.outcomes.values():
        counts[record["outcome"]] += 1
    return counts


def format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in counts.items() if n)


def report(runs: list[Run], args: argparse.Namespace, version: str) -> tuple[str, int]:
    """The Markdown report, and how many tests pass on Redis but not on ours."""
    tests = sorted({t for run in runs for t in run.outcomes}, key=_order)
    for run in runs:  # a run that died part-way: the rest did not run
        for test in tests:
            run.outcomes.setdefault(test, {"outcome": "not run", "message": "",
                                           "duration": 0.0})
    by_name = {run.name: run for run in runs}
    lines = [
        f"# Celery {version} integration suite: Redis and the event store",
        "",
        f"Modules: {', '.join(args.modules)}" + (f"; -k {args.k}" if args.k else "")
        + f"; per-test timeout {args.timeout} s.",
        "",
        "| run | broker and backend | " + " | ".join(OUTCOMES) + " | wall time |",
        "| --- | --- | " + " | ".join("---:" for _ in OUTCOMES) + " | ---: |",
    ]
    for run in runs:
        counts = totals(run)
        lines.append(f"| {run.name} | `{_redact(run.broker)}` | "
                     + " | ".join(str(counts[o]) for o in OUTCOMES)
                     + f" | {run.seconds:.0f} s |")
    gaps: list[str] = []
    if "redis" in by_name and "eventstore" in by_name:
        redis_run, ours = by_name["redis"], by_name["eventstore"]
        gaps = [t for t in tests if redis_run.outcomes[t]["outcome"] == "passed"
                and ours.outcomes[t]["outcome"] != "passed"]
        lines += ["", f"## Passes on Redis, not on the event store ({len(gaps)})", ""]
        if gaps:
            lines += ["| test | event store | why |", "| --- | --- | --- |"]
            for test in gaps:
                record = ours.outcomes[test]
                lines.append(f"| `{test}` | {record['outcome']} | "
                             f"{_cell(record['message'])} |")
        else:
            lines.append("None.")
        better = [t for t in tests if ours.outcomes[t]["outcome"] == "passed"
                  and redis_run.outcomes[t]["outcome"] != "passed"]
        lines += ["", f"## Passes on the event store, not on Redis ({len(better)})", ""]
        for test in better:
            record = redis_run.outcomes[test]
            lines.append(f"* `{test}`: {record['outcome']} on Redis: "
                         f"{_cell(record['message'])}")
        if not better:
            lines.append("None.")
    lines += ["", "## Every test (seconds in brackets)", "",
              "| test | " + " | ".join(run.name for run in runs) + " |",
              "| --- | " + " | ".join("---" for _ in runs) + " |"]
    for test in tests:
        cells = []
        for run in runs:
            record = run.outcomes[test]
            cells.append(f"{record['outcome']} ({record['duration']:.1f})")
        lines.append(f"| `{test}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", len(gaps)


def _order(test: str) -> tuple[str, str]:
    path, _, name = test.partition("::")
    return path, name


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:200]


def _redact(url: str) -> str:
    # The report names the scheme and database, never a password.
    parts = urlsplit(url.replace("eventstore+", "", 1))
    host = parts.hostname or ""
    prefix = "eventstore+" if url.startswith("eventstore+") else ""
    port = f":{parts.port}" if parts.port else ""
    return f"{prefix}{parts.scheme}://{host}{port}{parts.path}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="+", default=list(DEFAULT_MODULES),
                        help="t/integration modules to run (default: all that apply)")
    parser.add_argument("-k", help="pytest -k expression, passed through")
    parser.add_argument("-x", "--exitfirst", action="store_true",
                        help="stop each run at its first failure")
    parser.add_argument("--only", choices=("redis", "eventstore"),
                        help="run on one of the two only")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per test")
    parser.add_argument("--run-timeout", type=int, default=3 * 3600,
                        help="seconds per run before it is stopped")
    parser.add_argument("--postgresql-url", default=DEFAULT_POSTGRESQL,
                        help="SQLAlchemy URL of a database to make a schema in")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/7",
                        help="the reference broker and backend (flushed first)")
    parser.add_argument("--side-redis-db", type=int, default=8,
                        help="Redis database for the tests' side channel (flushed first)")
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                        / "celery-eventstore",
                        help="where the extracted suite is kept between runs")
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="where each run's pytest output goes (default: a temp dir)")
    parser.add_argument("--report", type=Path, default=Path("celery-integration-report.md"))
    parser.add_argument("--keep-schema", action="store_true",
                        help="leave the event store's schema for inspection")
    args = parser.parse_args(argv)
    args.modules = [m.removesuffix(".py") for m in args.modules]
    if args.log_dir is None:
        args.log_dir = Path(tempfile.mkdtemp(prefix="celery-suite-logs-"))
    args.log_dir.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    version = celery_version()
    suite = fetch_suite(version, args.cache_dir)
    side = redis_db_url(args.redis_url, args.side_redis_db)
    runs: list[Run] = []
    if args.only in (None, "redis"):
        flush_redis(args.redis_url)
        flush_redis(side)
        run = Run("redis", args.redis_url)
        run_suite(run, suite, args, args.side_redis_db)
        runs.append(run)
    if args.only in (None, "eventstore"):
        flush_redis(side)
        schema, broker = create_schema(args.postgresql_url)
        run = Run("eventstore", broker)
        try:
            run_suite(run, suite, args, args.side_redis_db)
        finally:
            if args.keep_schema:
                print(f"[eventstore] kept schema {schema}")
            else:
                drop_schema(args.postgresql_url, schema)
        runs.append(run)
    text, gaps = report(runs, args, version)
    args.report.write_text(text)
    print(f"report: {args.report}; {gaps} test(s) pass on Redis but not on the event store")
    return 1 if gaps else 0


if __name__ == "__main__":
    sys.exit(main())
