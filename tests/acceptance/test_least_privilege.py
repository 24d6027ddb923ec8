"""Least privilege: the grants docs/operations.rst ("Database roles") documents are
enough, and each of them is needed (issue 10, item 10).

A private PostgreSQL server (it creates roles, which are cluster-wide) holds three
roles: ``owner`` migrates the store into schema ``jobs``; ``app`` gets the
application's grants and runs a real worker, a producer and every CLI command, with
``auto_migrate`` on; ``auditor`` gets ``SELECT`` only and can read everything but
write nothing, each refusal one line.  The server logs every DDL statement with its
user: neither role ever attempts one.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import resultproj
import sqlalchemy as sa
from celery import chord
from harness import Broker, Worker
from pgserver import EmbeddedPostgres

from celery_eventstore import lifecycle as lc
from celery_eventstore.exceptions import DatabaseError, SchemaMissing
from celery_eventstore.storage import EventStore, NewMessage
from celery_eventstore.storage.routing import Binding, QueueInfo

pytestmark = [pytest.mark.slow, pytest.mark.postgresql]

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.rst"
SCHEMA = "jobs"
TIMEOUT = 60.0

#: Run by the server's superuser: the roles, the database's and the schema's
#: defaults taken away from PUBLIC, and a schema the owner owns.
SETUP = [
    "REVOKE ALL ON DATABASE test FROM PUBLIC",
    "REVOKE ALL ON SCHEMA public FROM PUBLIC",
    "CREATE ROLE jobs_owner LOGIN",
    "CREATE ROLE jobs_app LOGIN",
    "CREATE ROLE jobs_auditor LOGIN",
    "GRANT CONNECT ON DATABASE test TO jobs_owner",
    f"CREATE SCHEMA {SCHEMA} AUTHORIZATION jobs_owner",
    # Every DDL statement in the server log, with the role that sent it.
    "ALTER SYSTEM SET log_statement = 'ddl'",
    "ALTER SYSTEM SET log_line_prefix = '%%m [%%p] user=%%u '",
]

#: The application role's grants, exactly as docs/operations.rst gives them.
APP_GRANTS = [
    "GRANT CONNECT ON DATABASE test TO jobs_app",
    "GRANT USAGE ON SCHEMA jobs TO jobs_app",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA jobs TO jobs_app",
    "GRANT USAGE ON ALL SEQUENCES IN SCHEMA jobs TO jobs_app",
]
#: The auditors' read-only role, as docs/operations.rst gives it.
AUDITOR_GRANTS = [
    "GRANT CONNECT ON DATABASE test TO jobs_auditor",
    "GRANT USAGE ON SCHEMA jobs TO jobs_auditor",
    "GRANT SELECT ON ALL TABLES IN SCHEMA jobs TO jobs_auditor",
]
#: So that the tables of a later migration are granted too (run by the owner).
DEFAULT_PRIVILEGES = [
    "ALTER DEFAULT PRIVILEGES IN SCHEMA jobs"
    " GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO jobs_app",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA jobs GRANT USAGE ON SEQUENCES TO jobs_app",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA jobs GRANT SELECT ON TABLES TO jobs_auditor",
]


class Cluster:
    def __init__(self, server: EmbeddedPostgres) -> None:
        self.server = server
        #: Where the current test's part of the server log starts.
        self.since = 0

    def url(self, role: str) -> str:
        return self.server.url.replace("postgres@", f"{role}@", 1)

    def run(self, role: str, statements: list[str]) -> None:
        engine = sa.create_engine(
            self.url(role), isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
        )
        with engine.connect() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)
        engine.dispose()

    def log_size(self) -> int:
        return self.server.log.stat().st_size

    def ddl_by(self, role: str) -> list[str]:
        """DDL statements ``role`` sent during the current test, from the server log."""
        with open(self.server.log, "rb") as log:
            log.seek(self.since)
            lines = log.read().decode(errors="replace").splitlines()
        return [line for line in lines if f"user={role} " in line and "statement:" in line]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    server = EmbeddedPostgres.start()
    try:
        c = Cluster(server)
        c.run("postgres", [*SETUP, "SELECT pg_reload_conf()"])
        # The owner migrates, as a deployment's migration job does.
        c.run("jobs_owner", DEFAULT_PRIVILEGES)
        assert cli(c.url("jobs_owner"), "migrate").stdout.startswith("schema at version")
        c.run("jobs_owner", [*APP_GRANTS[1:], *AUDITOR_GRANTS[1:]])
        c.run("postgres", [APP_GRANTS[0], AUDITOR_GRANTS[0]])
        yield c
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _log_since(request: pytest.FixtureRequest) -> None:
    if "cluster" in request.fixturenames:
        cluster: Cluster = request.getfixturevalue("cluster")
        cluster.since = cluster.log_size()


def cli(url: str, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    """``celery-eventstore --url URL --schema jobs ARGS`` as a process of its own."""
    done = subprocess.run(
        [sys.executable, "-m", "celery_eventstore.cli", "--url", url, "--schema", SCHEMA,
         *args],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    assert done.returncode == code, f"{args}: exit {done.returncode}\n{done.stdout}{done.stderr}"
    return done


def test_the_documented_grants_are_the_ones_tested() -> None:
    docs = " ".join(DOCS.read_text().split())
    for statement in [*APP_GRANTS, *AUDITOR_GRANTS, *DEFAULT_PRIVILEGES]:
        # The docs' database is "app"; the test server's is "test".
        documented = statement.replace("DATABASE test", "DATABASE app")
        assert f"{documented};" in docs, documented


@pytest.fixture
def app_broker(cluster: Cluster, tmp_path: Path) -> Iterator[Broker]:
    """A harness broker whose every connection is the application role's; with
    ``auto_migrate`` on (the transport's default) for the worker and the producer."""
    broker = Broker("postgresql", cluster.url("jobs_app"), SCHEMA, tmp_path)
    try:
        yield broker
    finally:
        for worker in broker.workers:
            worker.stop()
        broker.close()


def dead_letter(store: EventStore, queue: str) -> str:
    """Publish to ``queue`` and reject the delivery for good: one dead letter."""
    store.declare_queue(QueueInfo(queue, transient=False))
    store.publish([NewMessage(stream=uuid.uuid4().hex, queue=queue, message={"body": "x"})])
    (claimed,) = store.claim([queue], 1, "test", 30)
    store.reject([claimed.ref], requeue=False)
    return claimed.delivery


def test_the_application_role_runs_a_worker_a_producer_and_every_cli_command(
    cluster: Cluster, app_broker: Broker
) -> None:
    worker = Worker(app_broker, f"least-{uuid.uuid4().hex[:6]}", [], app="resultproj")
    app_broker.workers.append(worker)
    worker.wait_ready()
    app = resultproj.make_app(app_broker.url, app_broker.transport_options())
    try:
        add, tsum = app.tasks["resultproj.add"], app.tasks["resultproj.tsum"]
        result = add.delay(2, 3)
        assert result.get(timeout=TIMEOUT) == 5
        assert chord([add.s(i, i) for i in range(3)], tsum.s()).delay().get(timeout=TIMEOUT) == 6
        assert app.control.ping(timeout=5.0)  # broadcast and reply through the store
        scheduled = add.apply_async((1, 1), countdown=3600).id
        result.forget()
    finally:
        app.pool.force_close_all()
        app.close()
    retried = dead_letter(app_broker.store, "dead_one")
    dead_letter(app_broker.store, "dead_two")
    url = cluster.url("jobs_app")

    assert "wake-ups   working" in cli(url, "check").stdout
    assert "up to date" in cli(url, "migrate").stdout
    assert "nothing to migrate" in cli(url, "migrate", "--sql").stdout
    assert "Published" in cli(url, "history", scheduled).stdout
    assert cli(url, "tail", "-n", "5").stdout
    assert "dead_one" in cli(url, "queues").stdout
    assert retried in cli(url, "dead").stdout
    assert retried in cli(url, "dead", "retry", retried).stdout
    assert "purged 1 dead letters" in cli(url, "dead", "purge", "--queue", "dead_two").stdout
    assert "revoked" in cli(url, "revoke", scheduled).stdout
    assert "pruned" in cli(url, "prune", "--older-than", "0s").stdout
    assert "replayed" in cli(url, "rebuild").stdout

    assert worker.proc.poll() is None, worker.tail()
    assert "permission denied" not in worker.log(), worker.tail()
    assert cluster.ddl_by("jobs_app") == []


READS = [("check",), ("history", "{task}"), ("queues",), ("tail",), ("dead",), ("migrate",)]
WRITES = [
    ("revoke", "{task}"),
    ("dead", "retry", "{delivery}"),
    ("dead", "purge"),
    ("prune", "--older-than", "0s"),
    ("rebuild",),
]


@pytest.fixture
def audited(cluster: Cluster) -> dict[str, str]:
    """Written by the app for the auditor to look at: a waiting task, a dead letter,
    and a finished task (that ``prune`` would delete)."""
    store = EventStore(cluster.url("jobs_app"), schema=SCHEMA)
    try:
        task, done = uuid.uuid4().hex, uuid.uuid4().hex
        store.declare_queue(QueueInfo("audited", transient=False))
        store.publish([NewMessage(stream=s, queue="audited", message={}) for s in (done, task)])
        (finished,) = store.claim(["audited"], 1, "test", 30)
        store.ack([finished.ref])
        return {"task": task, "delivery": dead_letter(store, "audited_dead")}
    finally:
        store.close()


@pytest.mark.parametrize("command", READS, ids=" ".join)
def test_the_auditor_role_reads(
    cluster: Cluster, audited: dict[str, str], command: tuple[str, ...]
) -> None:
    done = cli(cluster.url("jobs_auditor"), *(a.format(**audited) for a in command))
    assert done.stdout and not done.stderr
    if command == ("check",):
        assert "wake-ups   not tested" in done.stdout
        assert "permission denied" in done.stdout
    assert cluster.ddl_by("jobs_auditor") == []


@pytest.mark.parametrize("command", WRITES, ids=" ".join)
def test_the_auditor_role_cannot_write_and_is_told_in_one_line(
    cluster: Cluster, audited: dict[str, str], command: tuple[str, ...]
) -> None:
    done = cli(cluster.url("jobs_auditor"), *(a.format(**audited) for a in command), code=2)
    assert re.fullmatch(r"error: .*permission denied for table \w+\n", done.stderr), done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_auto_migrate_without_the_right_to_migrate_says_who_must(cluster: Cluster) -> None:
    """A schema that is not there yet (another prefix) and a role that may not
    create it: one clear error that says to migrate as a role that may."""
    store = EventStore(
        cluster.url("jobs_app"), schema=SCHEMA, table_prefix="later_", auto_migrate=True
    )
    try:
        with pytest.raises(SchemaMissing) as info:
            store.publish([NewMessage(stream="t", queue="q", message={})])
    finally:
        store.close()
    text = str(info.value)
    assert "permission denied for schema jobs" in text
    # The command it names works as given: the options go before the command.
    assert f"`celery-eventstore --url URL --table-prefix later_ --schema {SCHEMA} migrate`" in (
        text
    )
    assert "Database roles" in text
    assert cluster.ddl_by("jobs_app") != []  # it tried, and was refused


# -- each grant is needed ----------------------------------------------------------


def exercise(store: EventStore) -> None:
    """What a worker, a producer, the result backend and the CLI ask of the store."""
    suffix = uuid.uuid4().hex[:8]
    queue, reply, task = f"q{suffix}", f"r{suffix}", f"t{suffix}"
    store.ping()
    store.declare_queue(QueueInfo(queue, transient=False))
    store.declare_queue(QueueInfo(reply, transient=True, expires=60))
    store.bind(Binding(f"ex{suffix}", queue, "rk", None, "direct"))
    store.put_transient([(reply, {"reply": 1}, 0, None)])
    store.take_transient([reply], 5)
    store.publish([NewMessage(stream=f"{task}-{i}", queue=queue, message={}) for i in range(4)])
    claimed = store.claim([queue], 4, "exercise", 30)
    store.renew([claimed[0].ref], 30)
    store.ack([claimed[0].ref])
    store.reject([claimed[1].ref], requeue=False)
    store.restore([claimed[2].ref])
    store.execute(f"{task}-0", lc.Forget())
    store.execute(lc.group_stream(task), lc.SaveGroup(result={}))
    store.results([f"{task}-0"])
    store.retry_dead(claimed[1].delivery)
    store.purge(queue)
    store.touch_queues([queue])
    store.sweep()
    store.queue_stats()
    store.prune(store.now() + 10)
    store.rebuild()
    store.unbind(f"ex{suffix}", queue, "rk")
    store.forget_queue(reply)
    store.migrate()  # current: reads the version under the lock, runs nothing


@pytest.mark.parametrize(
    "grant",
    [
        "USAGE ON SCHEMA jobs",
        *(f"{p} ON ALL TABLES IN SCHEMA jobs" for p in ("SELECT", "INSERT", "UPDATE", "DELETE")),
        "USAGE ON ALL SEQUENCES IN SCHEMA jobs",
    ],
)
def test_each_grant_of_the_application_role_is_needed(cluster: Cluster, grant: str) -> None:
    exercise_as(cluster, "jobs_app")  # with every grant: it works
    cluster.run("jobs_owner", [f"REVOKE {grant} FROM jobs_app"])
    try:
        with pytest.raises(DatabaseError, match="permission denied"):
            exercise_as(cluster, "jobs_app")
    finally:
        cluster.run("jobs_owner", [f"GRANT {grant} TO jobs_app"])
    assert cluster.ddl_by("jobs_app") == []


def test_select_on_the_sequences_is_not_needed(cluster: Cluster) -> None:
    """Inserts draw their positions with ``nextval``, which needs USAGE only."""
    engine = sa.create_engine(cluster.url("postgres"), poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        granted = conn.execute(sa.text(
            "SELECT bool_or(has_sequence_privilege('jobs_app', c.oid, 'USAGE')),"
            " bool_or(has_sequence_privilege('jobs_app', c.oid, 'SELECT'))"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'jobs' AND c.relkind = 'S'"
        )).one()
    engine.dispose()
    assert tuple(granted) == (True, False)
    exercise_as(cluster, "jobs_app")


#: What the application role never uses, table by table (the narrower grant form).
UNUSED = [
    "UPDATE ON jobs.eventstore_events",
    "UPDATE ON jobs.eventstore_dead_letters",
    "INSERT, UPDATE, DELETE ON jobs.eventstore_schema_version",
]


def test_the_narrower_grants_are_enough(cluster: Cluster) -> None:
    """The log is never updated, the dead letters neither, the schema version only read."""
    cluster.run("jobs_owner", [f"REVOKE {grant} FROM jobs_app" for grant in UNUSED])
    try:
        exercise_as(cluster, "jobs_app")
    finally:
        cluster.run("jobs_owner", [f"GRANT {grant} TO jobs_app" for grant in UNUSED])


def exercise_as(cluster: Cluster, role: str) -> None:
    store = EventStore(cluster.url(role), schema=SCHEMA, auto_migrate=True)
    try:
        exercise(store)
    finally:
        store.close()
